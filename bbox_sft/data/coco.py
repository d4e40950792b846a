"""COCO instances JSON (Roboflow, CVAT, Label Studio, the official files) -> labelled boxes per image.

Every annotation is checked as :mod:`bbox_sft.data.detections` says, and what cannot be used is
counted by reason. pycocotools' ``COCO`` reader indexes a file but checks nothing (and a missing
list is a ``KeyError``), so the file is read here with its checks. Boxes are read in the upright
frame (after an EXIF turn), as annotation tools show the image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..formats import LabelledBox
from .detections import DetectionAnnotations, DetectionImage, Layout, coco_box

ANNOTATION_NAMES = ("annotations.json", "_annotations.coco.json")


class CocoFormatError(ValueError):
    """An annotation file that is not COCO instances JSON."""


def load_coco_json(path: Path) -> dict[str, Any]:
    """A COCO instances file, checked for its three lists (:class:`CocoFormatError` naming the file if not)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CocoFormatError(f"{path}: cannot read COCO JSON ({type(error).__name__}: {error})") from error
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                      "categories")):
        raise CocoFormatError(f"{path}: not COCO instances JSON (needs lists 'images', 'annotations', 'categories')")
    return data


def _entries(data: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    return {e.get("id"): e for e in data["images"] if isinstance(e, dict) and isinstance(e.get("file_name"), str)}


def read_coco(annotation_file: str | Path, image_dir: str | Path, sizes: dict[str, tuple[int, int]] | None = None,
              data: dict[str, Any] | None = None) -> DetectionAnnotations:
    """Read and check a COCO instances file (or its already loaded ``data``).

    ``sizes`` (image path -> upright width, height, as measured from the files) overrides the sizes the
    JSON states; with ``sizes`` given, an image not in it was skipped and its boxes count as
    ``image_skipped``.
    """
    path, image_dir = Path(annotation_file), Path(image_dir)
    data = data if data is not None else load_coco_json(path)
    names = {c.get("id"): str(c.get("name")) for c in data["categories"] if isinstance(c, dict)}
    entries = _entries(data)
    read = DetectionAnnotations([], list(dict.fromkeys(names.values())))
    objects: dict[Any, list[LabelledBox]] = {key: [] for key in entries}
    lost: dict[Any, dict[str, int]] = {key: {} for key in entries}

    def size(entry: dict[str, Any]) -> tuple[Any, Any] | None:
        if sizes is not None:
            return sizes.get(str(image_dir / entry["file_name"]))
        return entry.get("width"), entry.get("height")

    for annotation in data["annotations"]:
        if not isinstance(annotation, dict):
            read.skip("bad_annotation", json.dumps(annotation))
            continue
        key = annotation.get("image_id")
        entry = entries.get(key)
        reason = ("unknown_image" if entry is None else "crowd" if annotation.get("iscrowd", 0)
                  else "unknown_category" if annotation.get("category_id") not in names else None)
        box = None
        if reason is None:
            measured = size(entry)
            if measured is None:
                reason = "image_skipped"
            elif not (isinstance(measured[0], int) and isinstance(measured[1], int) and min(measured) > 0):
                reason = "unknown_image_size"
            else:
                box, note = coco_box(annotation.get("bbox"), *measured)
                reason = note if box is None else None
                if box is not None and note:
                    read.fixed[note] += 1
        if reason is not None:
            read.skip(reason, json.dumps(annotation))
            if entry is not None:
                lost[key][reason] = lost[key].get(reason, 0) + 1
            continue
        objects[key].append(LabelledBox(names[annotation["category_id"]], box))

    for key, entry in entries.items():
        width, height = size(entry) or (0, 0)
        read.images.append(DetectionImage(image_id=Path(entry["file_name"]).stem,
                                          path=str(image_dir / entry["file_name"]), width=int(width or 0),
                                          height=int(height or 0), objects=tuple(objects[key]),
                                          lost=tuple(sorted(lost[key].items()))))
    return read


def image_folder(annotation_file: Path, data: dict[str, Any], root: Path) -> Path:
    """Where the images of ``data`` (a loaded annotation file) lie: the first folder holding its first image
    (beside the file, in ``images/``, or the folder an official file name names, e.g. ``val2017/``)."""
    stem = annotation_file.stem.removeprefix("instances_")
    folders = [annotation_file.parent / "images", annotation_file.parent, root / "images", root / stem, root]
    first = next((e["file_name"] for e in _entries(data).values()), None)
    return next((f for f in folders if first is None or (f / first).exists()), folders[0])  # checks name the missing


class CocoLayout(Layout):
    """A COCO instances file and its images: ``annotations.json``, Roboflow's ``_annotations.coco.json``
    (beside the images), or ``annotations/instances_*.json`` (the official files)."""

    name = "coco"
    description = ("a COCO annotation file (annotations.json, _annotations.coco.json or annotations/instances_*.json) "
                   "and its images")

    def __init__(self, annotation_file: Path, root: Path) -> None:
        self.annotation_file, self.root = annotation_file, root
        self.data = load_coco_json(annotation_file)  # read once: official files run to hundreds of MB
        self.image_dir = image_folder(annotation_file, self.data, root)

    @classmethod
    def files(cls, folder: Path) -> list[Path]:
        """The COCO files of ``folder``: its one ``annotations.json`` / ``_annotations.coco.json``, else every
        ``annotations/instances_*.json``."""
        own = [folder / name for name in ANNOTATION_NAMES if (folder / name).is_file()]
        return own[:1] or sorted((folder / "annotations").glob("instances_*.json"))

    @classmethod
    def find(cls, folder: Path) -> CocoLayout | None:
        found = cls.files(folder)
        return cls(found[0], folder) if found else None

    @property
    def source(self) -> str:
        return str(self.annotation_file)

    def image_paths(self) -> list[str]:
        return [str(self.image_dir / e["file_name"]) for e in _entries(self.data).values()]

    def read(self, sizes: dict[str, tuple[int, int]]) -> DetectionAnnotations:
        return read_coco(self.annotation_file, self.image_dir, sizes=sizes, data=self.data)
