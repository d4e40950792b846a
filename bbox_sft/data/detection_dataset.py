"""A ``datasets`` detection set (a ``save_to_disk`` folder or a Hub id) -> labelled boxes per image.

The convention of transformers' object-detection guide (``cppe-5`` and its like): an ``image``
column and an ``objects`` column with ``bbox`` (COCO ``[x, y, w, h]`` pixels) and ``category``
(indices of a ``ClassLabel``, whose names are the labels; plain strings are taken as they are).
``objects`` may be a mapping of lists or a list of mappings. Each split of the set stays its split
(``valid`` -> ``validation``). Images are written to the build's work folder and checked there like
any file.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm

from ..formats import LabelledBox
from .detections import DetectionAnnotations, Layout, coco_box
from .sources import load_dataset_source
from .splits import split_name


def category_names(features: datasets.Features) -> list[str] | None:
    """The names of the ``objects`` column's ``category`` ClassLabel, or None when categories are strings."""
    objects = features["objects"]
    inner = objects[0] if isinstance(objects, list) else objects
    category = inner.get("category") if isinstance(inner, dict) else getattr(inner, "feature", {}).get("category")
    while category is not None and not isinstance(category, datasets.ClassLabel):
        category = getattr(category, "feature", None)
    return list(category.names) if category is not None else None


def _rows(objects: Any) -> list[tuple[Any, Any]]:
    """``(bbox, category)`` pairs of one ``objects`` cell, as a mapping of lists or a list of mappings."""
    if isinstance(objects, dict):
        return list(zip(objects.get("bbox") or [], objects.get("category") or []))
    return [(o.get("bbox"), o.get("category")) for o in objects or [] if isinstance(o, dict)]


class DetectionDatasetLayout(Layout):
    """One split of a ``datasets`` detection set, its images written under ``image_dir``."""

    name = "datasets"
    description = "a datasets detection set (image + objects {bbox, category} columns; a save_to_disk folder or Hub id)"

    def __init__(self, dataset: datasets.Dataset, label: str, image_dir: Path) -> None:
        if "image" not in dataset.column_names or "objects" not in dataset.column_names:
            raise ValueError(f"{label}: a detection dataset needs 'image' and 'objects' columns; it has "
                             f"{dataset.column_names}")
        self.dataset, self.label, self.image_dir = dataset, label, image_dir
        self.names = category_names(dataset.features)
        self.paths: list[str] = []

    @staticmethod
    def load(source: str) -> datasets.DatasetDict:
        loaded = load_dataset_source(source)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})

    @classmethod
    def splits_of(cls, source: str, work_dir: Path) -> dict[str, DetectionDatasetLayout]:
        loaded = cls.load(source)
        return {split_name(name): cls(split, f"{source} [{name}]", work_dir / "images" / name)
                for name, split in loaded.items()}

    @classmethod
    def find(cls, folder: Path) -> None:  # found by is_dataset_source, not by a folder's files
        return None

    @property
    def source(self) -> str:
        return self.label

    def image_paths(self) -> list[str]:
        if not self.paths:
            self.image_dir.mkdir(parents=True, exist_ok=True)
            raw = self.dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
            for record in tqdm(raw, desc="Writing the dataset's images", unit="image"):
                image = record["image"] or {}
                data = image.get("bytes") or (Path(image["path"]).read_bytes() if image.get("path") else b"")
                stem = Path(image.get("path") or "").stem or hashlib.sha1(data).hexdigest()[:16]
                path = self.image_dir / f"{len(self.paths):06d}_{stem}.img"
                path.write_bytes(data)
                self.paths.append(str(path))
        return list(self.paths)

    def read(self, sizes: dict[str, tuple[int, int]]) -> DetectionAnnotations:
        paths = self.image_paths()
        read = DetectionAnnotations([], list(self.names or []))
        seen: dict[str, None] = {}
        for path, objects in zip(paths, self.dataset["objects"]):
            size, kept, lost = sizes.get(path), [], Counter()
            for bbox, category in _rows(objects):
                where = json.dumps({"bbox": bbox, "category": category}, default=str)
                if size is None:
                    box, reason, label = None, "image_skipped", None
                elif self.names is not None and not (isinstance(category, int) and 0 <= category < len(self.names)):
                    box, reason, label = None, "unknown_category", None
                else:
                    label = self.names[category] if self.names is not None else str(category)
                    box, reason = coco_box(list(bbox) if isinstance(bbox, (list, tuple)) else bbox, *size)
                    if box is not None and reason:
                        read.fixed[reason] += 1
                        reason = None
                if box is None:
                    read.skip(reason, where)
                    lost[reason] += 1
                else:
                    seen.setdefault(label)
                    kept.append(LabelledBox(label, box))
            read.add(Path(path).stem.split("_", 1)[1], path, size, kept, lost)
        if self.names is None:
            read.categories = sorted(seen)
        return read
