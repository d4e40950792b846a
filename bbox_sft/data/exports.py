"""Which detection layout a folder holds, and its splits: what the detection builder reads.

Looked for in this order: a ``datasets`` set (a ``save_to_disk`` folder or a Hub id); a layout
that names its own splits (YOLO's ``data.yaml``, VOC's ``ImageSets/Main``, COCO's official
``annotations/instances_{train,val}*.json``); split folders (``train/``, ``valid/`` or ``val/`` or
``validation/``, ``test/``: Roboflow's export root, any layout inside each); one unsplit layout in the
folder itself (split later by a stable hash of the image id).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .coco import CocoLayout
from .detection_dataset import DetectionDatasetLayout
from .detections import Layout
from .sources import is_dataset_source
from .voc import VocLayout
from .yolo import YoloLayout

LAYOUTS: tuple[type[Layout], ...] = (CocoLayout, YoloLayout, VocLayout)
SPLIT_FOLDERS = {"train": "train", "valid": "validation", "val": "validation", "validation": "validation",
                 "test": "test"}


@dataclass(frozen=True)
class Export:
    """A detection export: its layout's name and its parts, each an annotation source and the split the
    export gave it (None: the export is unsplit)."""

    layout: str
    parts: tuple[tuple[str | None, Layout], ...]

    @property
    def split(self) -> bool:
        return self.parts[0][0] is not None


def describe_layouts() -> str:
    """Every layout, for the message when none is found."""
    return "; or ".join([*(layout.description for layout in LAYOUTS), DetectionDatasetLayout.description,
                         "any of these in train/ valid/ test/ folders"])


def _coco_splits(root: Path) -> dict[str, Layout] | None:
    files = CocoLayout.files(root)
    if len(files) < 2:
        return None
    named = {}
    for file in files:
        stem = file.stem.lower()
        split = "train" if "train" in stem else "validation" if "val" in stem else "test" if "test" in stem else None
        if split is None or split in named:
            return None
        named[split] = CocoLayout(file, root)
    return named


def _single(folder: Path) -> Layout | None:
    return next((found for layout in LAYOUTS if (found := layout.find(folder)) is not None), None)


def find_export(data_dir: str | Path, work_dir: Path) -> Export | None:
    """The detection export in ``data_dir``, or None; a ``datasets`` set's images go under ``work_dir``."""
    path = Path(data_dir)
    if is_dataset_source(data_dir):
        parts = DetectionDatasetLayout.splits_of(str(data_dir), work_dir)
        return Export(DetectionDatasetLayout.name, tuple(parts.items()))
    if not path.is_dir():
        return None
    for own in (YoloLayout.splits(path), VocLayout.splits(path), _coco_splits(path)):
        if own:
            return Export(next(iter(own.values())).name, tuple(own.items()))
    folders: dict[str, Layout] = {}
    for name, split in SPLIT_FOLDERS.items():
        found = _single(path / name) if (path / name).is_dir() and split not in folders else None
        if found is not None:
            folders[split] = found
    if folders:
        kinds = {part.name for part in folders.values()}
        return Export("/".join(sorted(kinds)), tuple((s, folders[s]) for s in ("train", "validation", "test")
                                                      if s in folders))
    found = _single(path)
    return Export(found.name, ((None, found),)) if found is not None else None


def has_detection(data_dir: str) -> bool:
    """Whether ``data_dir`` holds a detection export (reading annotation files only to tell the layout)."""
    path = Path(data_dir)
    if is_dataset_source(data_dir):
        return True
    if not path.is_dir():
        return False
    looks = [path, *(path / name for name in SPLIT_FOLDERS if (path / name).is_dir())]
    return YoloLayout.data_yaml(path) is not None or any(
        CocoLayout.files(folder) or (folder / "images").is_dir() and (folder / "labels").is_dir()
        or (folder / "Annotations").is_dir() or any(folder.glob("*.xml")) for folder in looks)
