"""Detection exports -> chat records for the ``objects`` and ``phrase`` tasks, as a ``datasets`` builder.

    builder = DetectionBoxes(data_dir="D", cache_dir="cache", task="objects")
    builder.download_and_prepare()
    dataset = builder.as_dataset()          # DatasetDict: train / validation / test

``data_dir`` holds any layout :mod:`bbox_sft.data.exports` finds: COCO JSON (a file, or Roboflow's
``train/ valid/ test/`` root), YOLO, Pascal VOC, or a ``datasets`` detection set. An export's own
splits are kept (each cut to its split size); an unsplit one is split by a stable hash of the image
id, so the ``phrase`` records of one image never straddle two splits. Images are checked as the
saliency builder checks them, boxes as :mod:`bbox_sft.data.detections` says, and every box is
accounted for in :attr:`DetectionBoxes.report`: kept, or lost by reason, per split.

No image is dropped for holding many objects: ``max_objects`` (default None: no limit) keeps the
``max_objects`` largest boxes of an image (written in the answer's order) and counts the others
as ``over_max_objects``. Categories without a single kept box (Roboflow's placeholder category, a
class no image uses) are left out of the label set and reported.

- ``objects``: one record per image; the answer lists every object (``[]`` for none).
- ``phrase``: per image, one record per category present, plus ``absent_per_image`` categories it
  does not hold (answer ``[]``), chosen by a stable hash, so the model learns to say none.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import datasets
from tqdm.auto import tqdm

from ..hub import counts
from ..records import OBJECT_FEATURES
from ..tasks import Annotation, get_task
from .checks import check_image, image_bytes
from .config import BoxesConfig
from .detections import DetectionImage
from .exports import describe_layouts, find_export
from .splits import all_splits, assign_splits, hash_unit, size_of

logger = logging.getLogger(__name__)
UNSPLIT = "unsplit"  # where the boxes of an unsplit export's images that no split took are counted


@dataclass
class DetectionBoxesConfig(BoxesConfig):
    """How many absent categories a phrase image is asked for, the most boxes an image's answer may hold
    (None: all of them), and the options every builder takes."""

    source: ClassVar[str] = "detection"
    task: str = "objects"
    absent_per_image: int = 1
    max_objects: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_objects is not None and self.max_objects < 1:
            raise ValueError(f"max_objects must be at least 1 (or None for no limit), got {self.max_objects}")


def cut_to(image: DetectionImage, max_objects: int | None) -> DetectionImage:
    """``image`` with its ``max_objects`` largest boxes (ties: the first read), in their order; the others
    counted as lost (``over_max_objects``)."""
    if max_objects is None or len(image.objects) <= max_objects:
        return image
    area = [(o.box.x_max - o.box.x_min) * (o.box.y_max - o.box.y_min) for o in image.objects]
    keep = sorted(sorted(range(len(area)), key=lambda i: -area[i])[:max_objects])
    cut = len(image.objects) - max_objects
    lost = dict(image.lost)
    lost["over_max_objects"] = lost.get("over_max_objects", 0) + cut
    return replace(image, objects=tuple(image.objects[i] for i in keep), lost=tuple(sorted(lost.items())))


class DetectionBoxes(datasets.GeneratorBasedBuilder):
    """Images with their labelled boxes, as TRL vision prompt/completion records."""

    BUILDER_CONFIG_CLASS = DetectionBoxesConfig
    VERSION = datasets.Version("1.0.0")

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description="Labelled boxes from detection annotations.",
                                    features=OBJECT_FEATURES)

    def _split_generators(self, dl_manager: datasets.DownloadManager) -> list[datasets.SplitGenerator]:
        config: DetectionBoxesConfig = self.config
        if not config.data_dir:
            raise ValueError("DetectionBoxes needs data_dir: a detection export (COCO, YOLO, VOC) or a datasets set")
        export = find_export(config.data_dir, Path(self.cache_dir) / "export")
        if export is None:
            raise FileNotFoundError(f"{config.data_dir}: no detection export found. Expected {describe_layouts()}.")
        paths = sorted({path for _, part in export.parts for path in part.image_paths()})
        checks = dict(zip(paths, self._check_all(paths, config.num_proc)))
        sizes = {path: (c.width, c.height) for path, c in checks.items() if c.skip is None}
        reads = [(split, part, part.read(sizes)) for split, part in export.parts]

        skipped_files = [{"image": p, "reason": c.skip, "detail": c.detail} for p, c in checks.items() if c.skip]
        skipped_files += [f for _, _, read in reads for f in read.unreadable_files]
        entries = unique_ids([(split, image) for split, _, read in reads for image in read.images])
        declared = list(dict.fromkeys(c for _, _, read in reads for c in read.categories))
        usable = {image.image_id: (split, cut_to(image, config.max_objects)) for split, image in entries
                  if image.path in sizes}
        categories = sorted({o.label for _, image in usable.values() for o in image.objects})
        dropped = [c for c in declared if c not in categories]

        split_sizes = {"train": config.train_size, "validation": config.val_size, "test": config.test_size}
        splits = all_splits(split for split, _ in export.parts)
        if export.split:  # the export's splits, each its first images in hash order up to its size
            split_ids = {s: sorted((i for i, (own, _) in usable.items() if own == s),
                                   key=lambda i: hash_unit(i, config.seed))[: size_of(s, split_sizes)]
                         for s in splits}
        else:
            split_ids = assign_splits(list(usable), split_sizes, seed=config.seed)
        final = {i: s for s, ids in split_ids.items() for i in ids}
        plans = {split: [plan for i in split_ids[split] for plan in
                         self._plans(usable[i][1], checks[usable[i][1].path], categories, config)]
                 for split in splits}
        boxes = box_ledger(reads, entries, usable, final)
        longest = max(((len(usable[i][1].objects), i) for i in final), default=(0, None))
        self.report = {
            "data_dir": str(config.data_dir),
            "layout": export.layout,
            "annotation_files": {split or UNSPLIT: part.source for split, part, _ in reads},
            "export_splits": [split for split, _ in export.parts] if export.split else None,
            "task": config.task,
            "categories": categories,
            "dropped_categories": {c: "no boxes" for c in dropped},
            "images_found": len(paths),
            "usable": len(usable),
            "objects": sum(len(usable[i][1].objects) for i in final),
            "boxes": {"found": sum(sum(v.values()) for v in boxes.values()),
                      "kept": sum(v.get("kept", 0) for v in boxes.values()),
                      "lost": dict(sum((Counter({k: n for k, n in v.items() if k != "kept"}) for v in boxes.values()),
                                       Counter()))},
            "boxes_by_split": {split: {"kept": v.get("kept", 0), "lost": {k: n for k, n in sorted(v.items())
                                                                          if k != "kept"}}
                               for split, v in boxes.items()},
            "max_objects": config.max_objects,
            "most_objects": {"objects": longest[0], "image_id": longest[1]},
            "skipped": dict(Counter(f["reason"] for f in skipped_files)),
            "skipped_annotations": dict(sum((read.skipped for _, _, read in reads), Counter())),
            "fixed": dict(sum((read.fixed for _, _, read in reads), Counter())),
            "handled": dict(Counter(h for _, image in usable.values() for h in checks[image.path].handled)),
            "requested_sizes": split_sizes,
            "split_sizes": {split: len(ids) for split, ids in split_ids.items()},
            "split_records": {split: len(p) for split, p in plans.items()},
            "config": {k: v for k, v in asdict(config).items() if k not in ("data_files", "version", "description")},
            "skipped_files": skipped_files,
            "skipped_annotation_examples": {k: v for _, _, read in reads for k, v in read.examples.items()},
        }
        logger.info(detection_summary_line(self.report))
        return [datasets.SplitGenerator(name=split, gen_kwargs={"plans": plans[split]}) for split in splits
                if plans[split]]

    @staticmethod
    def _check_all(paths: list[str], num_proc: int) -> list:
        progress = dict(total=len(paths), desc="Checking images", unit="image")
        if num_proc > 1:
            with ProcessPoolExecutor(num_proc) as pool:
                return list(tqdm(pool.map(check_image, paths, chunksize=64), **progress))
        return list(tqdm(map(check_image, paths), **progress))

    @staticmethod
    def _plans(image: DetectionImage, check, categories: list[str], config: DetectionBoxesConfig
               ) -> list[dict[str, Any]]:
        common = {"image_id": image.image_id, "path": image.path, "reencode": check.reencode,
                  "width": check.width, "height": check.height}
        examples = get_task(config.task).examples(image.image_id, Annotation(objects=tuple(image.objects)),
                                                  categories, config.absent_per_image, config.seed)
        return [{**common, "key": e.key, "query": e.query, "objects": e.target} for e in examples]

    def _generate_examples(self, plans: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
        config: DetectionBoxesConfig = self.config
        task = get_task(config.task)
        for plan in plans:
            yield plan["key"], {
                "image": image_bytes(plan["path"], plan["reencode"]),
                "image_id": plan["image_id"],
                "width": plan["width"],
                "height": plan["height"],
                **task.record(plan["query"], plan["objects"], config.answer_format),
            }


def unique_ids(entries: list[tuple[str | None, DetectionImage]]) -> list[tuple[str | None, DetectionImage]]:
    """The images with ids unique across the export: the file stem, or where two files share one (the same
    name in two splits), the stem and a short hash of the path."""
    stems = Counter(image.image_id for _, image in entries)
    return [(split, image if stems[image.image_id] == 1 else replace(
        image, image_id=f"{image.image_id}_{hashlib.sha1(image.path.encode()).hexdigest()[:8]}"))
        for split, image in entries]


def box_ledger(reads, entries, usable, final) -> dict[str, dict[str, int]]:
    """Every box found, under the split its image ended in (else the export's split, else ``unsplit``):
    kept, or lost by reason (``beyond_split_size``: a usable image no split had room for)."""
    ledger: dict[str, Counter] = defaultdict(Counter)
    for split, image in entries:
        place = final.get(image.image_id, split or UNSPLIT)
        used = usable.get(image.image_id, (None, image))[1]  # with its cut boxes counted as lost
        ledger[place]["kept" if image.image_id in final else "beyond_split_size"] += len(used.objects)
        ledger[place].update(dict(used.lost))
    for split, _, read in reads:  # boxes of no listed image (unknown_image, bad annotations)
        tied = sum((Counter(dict(image.lost)) for image in read.images), Counter())
        ledger[split or UNSPLIT].update(read.skipped - tied)
    return {split: {k: n for k, n in sorted(v.items()) if n} for split, v in sorted(ledger.items()) if +v}


def detection_summary_line(report: dict[str, Any]) -> str:
    splits = " / ".join(f"{s} {n} images ({report['split_records'][s]} records)"
                        for s, n in report["split_sizes"].items())
    boxes = report["boxes"]
    dropped = f"; categories without boxes left out: {', '.join(report['dropped_categories'])}" \
        if report["dropped_categories"] else ""
    return (f"{report['layout']}: {report['images_found']} images found, {report['usable']} usable; boxes "
            f"{boxes['kept']} of {boxes['found']} kept (lost: {counts(boxes['lost'])}); skipped images: "
            f"{counts(report['skipped'])}; fixed: {counts({**report['fixed'], **report['handled']})}{dropped}; "
            f"splits: {splits}")
