"""COCO detection annotations -> chat records for the ``objects`` and ``phrase`` tasks, as a ``datasets`` builder.

    builder = CocoBoxes(data_dir="D", cache_dir="cache", task="objects")
    builder.download_and_prepare()
    dataset = builder.as_dataset()          # DatasetDict: train / validation / test

``data_dir`` holds a COCO instances file (``annotations.json``, Roboflow's
``_annotations.coco.json``, or ``annotations/instances_*.json``) and its images (beside it, in
``images/``, or in the folder the official file name names, e.g. ``val2017/``). Images are checked
as the saliency builder checks them and annotations as :mod:`bbox_sft.data.coco` says; both are
counted by reason in :attr:`CocoBoxes.report`. Splits are drawn by image (hash-stable), so the
``phrase`` records of one image never straddle two splits.

- ``objects``: one record per image; the answer lists every object (``[]`` for none).
- ``phrase``: per image, one record per category present, plus ``absent_per_image`` categories it
  does not hold (answer ``[]``), chosen by a stable hash, so the model learns to say none.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import datasets
from tqdm.auto import tqdm

from ..grammar.lists import MAX_OBJECTS
from ..hub import counts
from ..records import OBJECT_FEATURES
from ..tasks import Annotation, get_task
from .checks import check_image, image_bytes
from .coco import CocoImage, load_coco_json, read_coco
from .config import BoxesConfig
from .splits import SPLITS, assign_splits

logger = logging.getLogger(__name__)

ANNOTATION_NAMES = ("annotations.json", "_annotations.coco.json")


def find_annotation_file(data_dir: str | Path) -> Path:
    """The COCO annotation file under ``data_dir`` (see the module docstring); the file is not read here."""
    root = Path(data_dir)
    candidates = [root / name for name in ANNOTATION_NAMES] + sorted((root / "annotations").glob("instances_*.json"))
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{root}: no COCO annotation file ({', '.join(ANNOTATION_NAMES)} or "
                                "annotations/instances_*.json)")
    return found


def has_coco(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds a COCO annotation file (else, for objects, its saliency masks are read)."""
    try:
        find_annotation_file(data_dir)
    except FileNotFoundError:
        return False
    return True


def image_folder(data_dir: str | Path, annotation_file: Path, data: dict[str, Any]) -> Path:
    """Where the images of ``data`` (a loaded annotation file) lie: the first folder holding its first image."""
    root = Path(data_dir)
    stem = annotation_file.stem.removeprefix("instances_")
    folders = [annotation_file.parent / "images", annotation_file.parent, root / "images", root / stem, root]
    first = next((i["file_name"] for i in data["images"]
                  if isinstance(i, dict) and isinstance(i.get("file_name"), str)), None)
    return next((f for f in folders if first is None or (f / first).exists()), folders[0])  # checks name the missing


@dataclass
class CocoBoxesConfig(BoxesConfig):
    """How many absent categories a phrase image is asked for, the most objects an image may hold, and the
    options every builder takes."""

    source: ClassVar[str] = "detection"
    task: str = "objects"
    absent_per_image: int = 1
    max_objects: int = MAX_OBJECTS


class CocoBoxes(datasets.GeneratorBasedBuilder):
    """Images with their labelled boxes, as TRL vision prompt/completion records."""

    BUILDER_CONFIG_CLASS = CocoBoxesConfig
    VERSION = datasets.Version("1.0.0")

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description="Labelled boxes from COCO detection annotations.",
                                    features=OBJECT_FEATURES)

    def _split_generators(self, dl_manager: datasets.DownloadManager) -> list[datasets.SplitGenerator]:
        config: CocoBoxesConfig = self.config
        if not config.data_dir:
            raise ValueError("CocoBoxes needs data_dir: a folder with a COCO annotation file and its images")
        annotation_file = find_annotation_file(config.data_dir)
        data = load_coco_json(annotation_file)  # read once: official files run to hundreds of MB
        image_dir = image_folder(config.data_dir, annotation_file, data)
        names = [i["file_name"] for i in data["images"] if isinstance(i, dict) and isinstance(i.get("file_name"), str)]
        checks = self._check_all([str(image_dir / name) for name in names], config.num_proc)
        sizes = {Path(name).name: (check.width, check.height) for name, check in zip(names, checks)
                 if check.skip is None}
        coco = read_coco(annotation_file, image_dir, sizes=sizes, data=data)  # boxes by the measured sizes
        checked = {str(image_dir / name): check for name, check in zip(names, checks)}
        pairs = [(image, checked[image.path]) for image in coco.images]
        skipped_files = [{"image": image.path, "reason": check.skip, "detail": check.detail}
                         for image, check in pairs if check.skip]
        for image in coco.images:
            if Path(image.path).name in sizes and len(image.objects) > config.max_objects:
                skipped_files.append({"image": image.path, "reason": "too_many_objects",
                                      "detail": f"{len(image.objects)} objects, more than max_objects "
                                                f"{config.max_objects}"})
        bad = {f["image"] for f in skipped_files}
        good = {image.image_id: (image, check) for image, check in pairs if image.path not in bad}
        split_sizes = {"train": config.train_size, "validation": config.val_size, "test": config.test_size}
        split_ids = assign_splits(list(good), split_sizes, seed=config.seed)
        plans = {split: [plan for i in split_ids[split] for plan in self._plans(*good[i], coco.categories, config)]
                 for split in SPLITS}
        self.report = {
            "data_dir": str(config.data_dir),
            "annotation_file": str(annotation_file),
            "image_dir": str(image_dir),
            "task": config.task,
            "categories": coco.categories,
            "images_found": len(coco.images),
            "usable": len(good),
            "objects": sum(len(image.objects) for image, _ in good.values()),
            "skipped": dict(Counter(f["reason"] for f in skipped_files)),
            "skipped_annotations": dict(coco.skipped),
            "fixed": dict(coco.fixed),
            "handled": dict(Counter(h for _, check in good.values() for h in check.handled)),
            "requested_sizes": split_sizes,
            "split_sizes": {split: len(ids) for split, ids in split_ids.items()},
            "split_records": {split: len(p) for split, p in plans.items()},
            "config": {k: v for k, v in asdict(config).items() if k not in ("data_files", "version", "description")},
            "skipped_files": skipped_files,
            "skipped_annotation_examples": coco.examples,
        }
        logger.info(coco_summary_line(self.report))
        return [datasets.SplitGenerator(name=split, gen_kwargs={"plans": plans[split]}) for split in SPLITS
                if plans[split]]

    @staticmethod
    def _check_all(paths: list[str], num_proc: int) -> list:
        progress = dict(total=len(paths), desc="Checking images", unit="image")
        if num_proc > 1:
            with ProcessPoolExecutor(num_proc) as pool:
                return list(tqdm(pool.map(check_image, paths, chunksize=64), **progress))
        return list(tqdm(map(check_image, paths), **progress))

    @staticmethod
    def _plans(image: CocoImage, check, categories: list[str], config: CocoBoxesConfig) -> list[dict[str, Any]]:
        common = {"image_id": image.image_id, "path": image.path, "reencode": check.reencode,
                  "width": check.width, "height": check.height}
        examples = get_task(config.task).examples(image.image_id, Annotation(objects=tuple(image.objects)),
                                                  categories, config.absent_per_image, config.seed)
        return [{**common, "key": e.key, "query": e.query, "objects": e.target} for e in examples]

    def _generate_examples(self, plans: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
        config: CocoBoxesConfig = self.config
        task = get_task(config.task)
        for plan in plans:
            yield plan["key"], {
                "image": image_bytes(plan["path"], plan["reencode"]),
                "image_id": plan["image_id"],
                "width": plan["width"],
                "height": plan["height"],
                **task.record(plan["query"], plan["objects"], config.answer_format),
            }


def coco_summary_line(report: dict[str, Any]) -> str:
    splits = " / ".join(f"{s} {report['split_sizes'][s]} images ({report['split_records'][s]} records)"
                        for s in SPLITS)
    return (f"{report['images_found']} images found, {report['usable']} usable with {report['objects']} objects; "
            f"skipped images: {counts(report['skipped'])}; skipped annotations: "
            f"{counts(report['skipped_annotations'])}; fixed: {counts({**report['fixed'], **report['handled']})}; "
            f"splits: {splits}")
