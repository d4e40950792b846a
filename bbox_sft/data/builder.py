"""The saliency -> box dataset as a ``datasets`` builder: DUTS archives or folders in, chat records out.

``datasets`` 5 dropped loading scripts, but a builder class shipped in a package still works
offline through ``download_and_prepare()`` / ``as_dataset()``::

    builder = SaliencyBoxes(data_dir="D", cache_dir="cache", train_size=2000)
    builder.download_and_prepare()
    dataset = builder.as_dataset()          # DatasetDict: train / validation / test

Every pair is checked first (in parallel with ``num_proc``): bad files are skipped and counted by
reason in :attr:`SaliencyBoxes.report`, the splits are drawn from the good ones, and only then are
records written.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, ClassVar

import datasets
from tqdm.auto import tqdm

from ..boxes import BOX_MODES, Box
from ..formats import LabelledBox
from ..records import BOX_FEATURES
from ..tasks import Annotation, get_task
from .checks import PairCheck, check_pair, image_bytes
from .config import BoxesConfig
from .sources import Pair, find_archives, find_pairs
from .splits import SPLITS, assign_splits

logger = logging.getLogger(__name__)
MASK_LABEL = "object"  # the objects task from saliency masks: components have no category

FEATURES = BOX_FEATURES  # the subject records


@dataclass
class SaliencyBoxesConfig(BoxesConfig):
    """How boxes are read from masks (the subject's box; for objects, every component of at least
    ``min_fraction`` of the largest, labelled "object"), and the options every builder takes."""

    source: ClassVar[str] = "saliency"
    box_mode: str = "largest"
    threshold: int = 128
    min_fraction: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.box_mode not in BOX_MODES:
            raise ValueError(f"box_mode must be one of {BOX_MODES}, got {self.box_mode!r}")


def _check(pair: Pair, config: SaliencyBoxesConfig) -> PairCheck:
    return check_pair(pair.image, pair.mask, config.threshold, config.box_mode, config.min_fraction)


class SaliencyBoxes(datasets.GeneratorBasedBuilder):
    """Images with the box of their main subject, as TRL vision prompt/completion records."""

    BUILDER_CONFIG_CLASS = SaliencyBoxesConfig
    VERSION = datasets.Version("1.0.0")

    def _info(self) -> datasets.DatasetInfo:
        task = get_task(self.config.task)
        return datasets.DatasetInfo(
            description=f"{task.title} boxes from saliency masks; " + task.instruction(),
            features=task.features,
            citation=DUTS_CITATION,
        )

    def _split_generators(self, dl_manager: datasets.DownloadManager) -> list[datasets.SplitGenerator]:
        config: SaliencyBoxesConfig = self.config
        if not config.data_dir:
            raise ValueError("SaliencyBoxes needs data_dir: a folder of DUTS archives/folders or images/ + masks/")
        archives = [str(a) for a in find_archives(config.data_dir)]
        roots = [config.data_dir, *(dl_manager.extract(archives) if archives else [])]
        pairs, orphans = find_pairs(roots)
        if not pairs:
            raise FileNotFoundError(
                f"{config.data_dir}: no images found. Expected DUTS-TR.zip / DUTS-TE.zip, "
                "DUTS-*/DUTS-*-Image + DUTS-*-Mask folders, or images/ + masks/ folders "
                "(bbox-sft prepare --download_help shows the layouts)."
            )
        checks = self._check_all(pairs, config)
        good = {p.image_id: (p, c) for p, c in zip(pairs, checks) if c.box is not None}
        test_pool = [i for i, (p, _) in good.items() if p.is_test_source]
        sizes = {"train": config.train_size, "validation": config.val_size, "test": config.test_size}
        split_ids = assign_splits(
            [i for i, (p, _) in good.items() if not p.is_test_source],
            sizes,
            seed=config.seed,
            test_ids=test_pool or None,
        )
        self.report = build_report(pairs, checks, orphans, split_ids, sizes, config)
        logger.info(summary_line(self.report))
        return [
            datasets.SplitGenerator(
                name=split,
                gen_kwargs={"records": [_record_plan(*good[i]) for i in split_ids[split]]},
            )
            for split in SPLITS
            if split_ids[split]  # ``datasets`` cannot write an empty split; prepare adds it back
        ]

    @staticmethod
    def _check_all(pairs: list[Pair], config: SaliencyBoxesConfig) -> list[PairCheck]:
        work = partial(_check, config=config)
        progress = partial(tqdm, total=len(pairs), desc="Reading masks", unit="pair")
        if config.num_proc > 1:
            with ProcessPoolExecutor(config.num_proc) as pool:
                return list(progress(pool.map(work, pairs, chunksize=64)))
        return list(progress(map(work, pairs)))

    def _generate_examples(self, records: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
        task, answer_format = get_task(self.config.task), self.config.answer_format
        for record in records:
            # the main subject's box, and every kept component labelled "object" (the objects task)
            annotation = Annotation(objects=tuple(LabelledBox(MASK_LABEL, Box(*b)) for b in record["boxes"]),
                                    main=record["box"])
            for example in task.examples(record["image_id"], annotation, [MASK_LABEL]):
                yield example.key, {
                    "image": image_bytes(record["path"], record["reencode"]),
                    "image_id": record["image_id"],
                    "width": record["width"],
                    "height": record["height"],
                    **task.record(example.query, example.target, answer_format),
                }


def _record_plan(pair: Pair, check: PairCheck) -> dict[str, Any]:
    return {
        "image_id": pair.image_id,
        "path": pair.image,
        "reencode": check.reencode,
        "width": check.width,
        "height": check.height,
        "box": tuple(check.box),
        "boxes": [tuple(b) for b in check.boxes],
    }


def build_report(
    pairs: list[Pair],
    checks: list[PairCheck],
    orphans: list,
    split_ids: dict[str, list[str]],
    sizes: dict[str, int],
    config: SaliencyBoxesConfig,
) -> dict[str, Any]:
    """What was found, kept, fixed and skipped (by reason, with every skipped file named)."""
    skipped = [
        {"image": p.image, "mask": p.mask, "reason": c.skip, "detail": c.detail}
        for p, c in zip(pairs, checks)
        if c.skip
    ]
    skipped += [{"image": None, "mask": o.mask, "reason": "missing_image", "detail": ""} for o in orphans]
    handled = Counter(h for c in checks for h in c.handled)
    return {
        "data_dir": str(config.data_dir),
        "sources": dict(Counter(p.source for p in pairs)),
        "pairs_found": len(pairs),
        "usable": sum(c.box is not None for c in checks),
        "skipped": dict(Counter(s["reason"] for s in skipped)),
        "handled": dict(handled),
        "requested_sizes": sizes,
        "split_sizes": {split: len(ids) for split, ids in split_ids.items()},
        "config": {k: v for k, v in asdict(config).items() if k not in ("data_files", "version", "description")},
        "skipped_files": skipped,
    }


def summary_line(report: dict[str, Any]) -> str:
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(report["skipped"].items())) or "none"
    handled = ", ".join(f"{n} {what}" for what, n in sorted(report["handled"].items())) or "none"
    splits = " / ".join(f"{split} {n}" for split, n in report["split_sizes"].items())
    return (
        f"{report['pairs_found']} pairs found, {report['usable']} usable; skipped: {skipped}; "
        f"fixed: {handled}; splits: {splits}"
    )


DUTS_CITATION = """\
@inproceedings{wang2017duts,
  title     = {Learning to Detect Salient Objects with Image-level Supervision},
  author    = {Wang, Lijun and Lu, Huchuan and Wang, Yifan and Feng, Mengyang and Wang, Dong
               and Yin, Baocai and Ruan, Xiang},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2017}
}"""
