"""YOLO text labels (Ultralytics, Roboflow, CVAT, LabelImg) -> labelled boxes per image.

The layout Ultralytics trains on: ``data.yaml`` with the class ``names`` and the image folder of each
split (``train``, ``val``, ``test``), and beside every ``.../images/...`` folder its ``.../labels/...``
twin holding one ``.txt`` per image: one ``class cx cy w h`` line per box, normalised to the image
(polygon lines of segmentation exports give their bounding box). Without ``data.yaml``, a folder
with ``images/`` + ``labels/`` and ``classes.txt`` (or ``obj.names``) is one unsplit set.

Each line is parsed by supervision (``yolo_annotations_to_detections``), one line at a time, so one
bad line costs one box, counted, not the file; supervision's folder loader raises on the first bad
file and decodes every image, which a build of thousands of photos cannot afford. An image without a
label file is a background image (no objects), as for Ultralytics; a label file without an image
has its boxes counted as ``unknown_image``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from ..formats import LabelledBox
from .detections import DetectionAnnotations, Layout, pixel_box
from .sources import IMAGE_SUFFIXES

YAML_NAMES = ("data.yaml", "dataset.yaml")
NAME_FILES = ("classes.txt", "obj.names")
YAML_SPLITS = {"train": "train", "val": "validation", "valid": "validation", "test": "test"}


class YoloFormatError(ValueError):
    """A ``data.yaml`` or class-name file that cannot say what the class indices mean."""


def class_names(value: Any, path: Path) -> list[str]:
    """``names`` of a data.yaml (a list, or a mapping index -> name) in index order."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, int) and not isinstance(k, bool) for k in value):
        return [str(value.get(i, f"class_{i}")) for i in range(max(value, default=-1) + 1)]  # gaps: unused ids
    raise YoloFormatError(f"{path}: 'names' must be a list of class names or a mapping index -> name")


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    if "images" in parts[:-1]:
        at = len(parts) - 2 - parts[:-1][::-1].index("images")
        parts[at] = "labels"
    return Path(*parts).with_suffix(".txt")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class YoloLayout(Layout):
    """One split of a YOLO export: its image folder (labels beside it) and the class names."""

    name = "yolo"
    description = ("a YOLO export (data.yaml with names and train/val/test image folders, each with its labels/ "
                   "twin; or images/ + labels/ + classes.txt)")

    def __init__(self, image_dir: Path, names: list[str]) -> None:
        self.image_dir, self.names = image_dir, names

    @staticmethod
    def data_yaml(root: Path) -> Path | None:
        return next((root / n for n in YAML_NAMES if (root / n).is_file()), None)

    @classmethod
    def read_yaml(cls, path: Path) -> dict[str, Any]:
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise YoloFormatError(f"{path}: cannot read YAML ({type(error).__name__}: {error})") from error
        if not isinstance(data, dict) or "names" not in data:
            raise YoloFormatError(f"{path}: a YOLO data.yaml needs 'names'")
        return data

    @classmethod
    def splits(cls, root: Path) -> dict[str, YoloLayout] | None:
        """The splits ``data.yaml`` names (paths as Ultralytics resolves them, Roboflow's ``../train/images``
        included), or None without one."""
        path = cls.data_yaml(root)
        if path is None:
            return None
        data = cls.read_yaml(path)
        names = class_names(data["names"], path)
        base = Path(data["path"]) if data.get("path") else root
        base = base if base.is_absolute() else root / base
        found: dict[str, YoloLayout] = {}
        for key, split in YAML_SPLITS.items():
            value = data.get(key)
            if not isinstance(value, str) or split in found:
                continue
            candidates = [base / value, root / value] + ([base / value[3:], root / value[3:]]
                                                          if value.startswith("../") else [])
            folder = next((c for c in candidates if c.is_dir()), None)
            if folder is None:
                raise YoloFormatError(f"{path}: {key}: {value!r} is not a folder (looked for {candidates[0]})")
            if any(part.image_dir.resolve() == folder.resolve() for part in found.values()):
                continue  # one folder named for train and val (a single set, as Ultralytics wants both keys): train
            found[split] = cls(folder, names)
        if not found:
            raise YoloFormatError(f"{path}: names no split folder (train / val / test)")
        return found

    @classmethod
    def find(cls, folder: Path) -> YoloLayout | None:
        if not ((folder / "images").is_dir() and (folder / "labels").is_dir()):
            return None
        path = cls.data_yaml(folder)
        if path is not None:
            return cls(folder / "images", class_names(cls.read_yaml(path)["names"], path))
        names = next((folder / n for n in NAME_FILES if (folder / n).is_file()), None)
        if names is None:
            return None
        return cls(folder / "images", [line.strip() for line in names.read_text().splitlines() if line.strip()])

    @property
    def source(self) -> str:
        return str(label_path(self.image_dir / "x.jpg").parent)

    def image_paths(self) -> list[str]:
        return [str(p) for p in _images(self.image_dir)]

    def read(self, sizes: dict[str, tuple[int, int]]) -> DetectionAnnotations:
        from supervision.dataset.formats.yolo import yolo_annotations_to_detections

        read = DetectionAnnotations([], list(self.names))
        images = _images(self.image_dir)
        for image in images:
            labels, size = label_path(image), sizes.get(str(image))
            lines = [line for line in labels.read_text().splitlines() if line.strip()] if labels.is_file() else []
            objects, lost = [], Counter()
            for number, line in enumerate(lines, 1):
                where = f"{labels.name}:{number}: {line}"
                reason, box = None, None
                if size is None:
                    reason = "image_skipped"
                else:
                    try:
                        found = yolo_annotations_to_detections([line], resolution_wh=(1, 1), with_masks=False)
                        index, (x0, y0, x1, y1) = int(found.class_id[0]), (float(v) for v in found.xyxy[0])
                    except (ValueError, IndexError) as error:
                        reason, where = "bad_bbox", f"{where} ({error})"
                    else:
                        if not 0 <= index < len(self.names):
                            reason = "unknown_category"
                        else:
                            width, height = size
                            box, note = pixel_box(x0 * width, y0 * height, x1 * width, y1 * height, width, height)
                            reason = note if box is None else None
                            if box is not None and note:
                                read.fixed[note] += 1
                if reason is not None:
                    read.skip(reason, where)
                    lost[reason] += 1
                else:
                    objects.append(LabelledBox(self.names[index], box))
            read.add(image.stem, str(image), size, objects, lost)
        label_dir = label_path(self.image_dir / "x.jpg").parent
        stems = {label_path(image) for image in images}
        for orphan in sorted(label_dir.rglob("*.txt")) if label_dir.is_dir() else []:
            if orphan not in stems:
                n = sum(1 for line in orphan.read_text().splitlines() if line.strip())
                if n:
                    read.skip("unknown_image", f"{orphan}: no image {orphan.stem}.* in {self.image_dir}", n)
        return read

