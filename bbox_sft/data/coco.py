"""COCO instances JSON + an image folder -> labelled boxes per image, for the ``objects`` and ``phrase`` tasks.

COCO JSON is what Roboflow, CVAT and Label Studio export. Every annotation is checked, and what
cannot be used is skipped and counted by reason, never silently dropped:

- ``crowd``: ``iscrowd: 1`` regions (a crowd, not one object);
- ``unknown_category`` / ``unknown_image``: ids with no category or image entry;
- ``bad_bbox``: not four finite numbers;
- ``zero_area``: no width or height (before or after clipping to the image);
- ``clipped_to_image`` (fixed, not skipped): a box reaching outside the image is cut to it.

Images go through the same checks as saliency images (:func:`~bbox_sft.data.checks.check_image`):
missing or unreadable files are skipped with their reason. Boxes are read in the upright frame
(after an EXIF turn), as annotation tools show the image.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..boxes import Box
from ..formats import LabelledBox


class CocoFormatError(ValueError):
    """An annotation file that is not COCO instances JSON."""


@dataclass(frozen=True)
class CocoImage:
    """One image entry with its usable objects (boxes normalised to [0, 1])."""

    image_id: str
    path: str
    width: int
    height: int
    objects: tuple[LabelledBox, ...]


@dataclass
class CocoAnnotations:
    """What an annotation file holds once checked: images, category names, and what was skipped or fixed."""

    images: list[CocoImage]
    categories: list[str]
    skipped: Counter = field(default_factory=Counter)
    fixed: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # one annotation per reason, to show the user


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


def _box(bbox: Any, width: int, height: int) -> tuple[Box | None, str | None]:
    """The normalised box of a COCO ``[x, y, w, h]`` in pixels, or the reason there is none."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                             and math.isfinite(v) for v in bbox)):
        return None, "bad_bbox"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None, "zero_area"
    x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
    if x1 <= x0 or y1 <= y0:
        return None, "zero_area"
    clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
    return Box(x0 / width, y0 / height, x1 / width, y1 / height), "clipped_to_image" if clipped else None


def read_coco(annotation_file: str | Path, image_dir: str | Path, sizes: dict[str, tuple[int, int]] | None = None,
              data: dict[str, Any] | None = None) -> CocoAnnotations:
    """Read and check a COCO instances file (or its already ``data``); ``sizes`` (file name -> upright width,
    height) overrides the sizes the JSON states, as measured from the files by the image checks."""
    path, image_dir = Path(annotation_file), Path(image_dir)
    data = data if data is not None else load_coco_json(path)
    names = {c.get("id"): str(c.get("name")) for c in data["categories"] if isinstance(c, dict)}
    entries: dict[Any, dict[str, Any]] = {}
    for entry in data["images"]:
        if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
            entries[entry.get("id")] = entry
    skipped, fixed, examples = Counter(), Counter(), {}
    objects: dict[Any, list[LabelledBox]] = {key: [] for key in entries}

    def skip(reason: str, annotation: Any) -> None:
        skipped[reason] += 1
        examples.setdefault(reason, json.dumps(annotation)[:200])

    for annotation in data["annotations"]:
        if not isinstance(annotation, dict):
            skip("bad_annotation", annotation)
            continue
        entry = entries.get(annotation.get("image_id"))
        if entry is None:
            skip("unknown_image", annotation)
            continue
        if annotation.get("iscrowd", 0):
            skip("crowd", annotation)
            continue
        if annotation.get("category_id") not in names:
            skip("unknown_category", annotation)
            continue
        width, height = (sizes or {}).get(entry["file_name"]) or (entry.get("width"), entry.get("height"))
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            skip("unknown_image_size", annotation)
            continue
        box, note = _box(annotation.get("bbox"), width, height)
        if box is None:
            skip(note, annotation)
            continue
        if note:
            fixed[note] += 1
        objects[annotation["image_id"]].append(LabelledBox(names[annotation["category_id"]], box))

    images = []
    for key, entry in entries.items():
        width, height = (sizes or {}).get(entry["file_name"]) or (entry.get("width") or 0, entry.get("height") or 0)
        images.append(CocoImage(image_id=Path(entry["file_name"]).stem, path=str(image_dir / entry["file_name"]),
                                width=int(width), height=int(height), objects=tuple(objects[key])))
    return CocoAnnotations(images, sorted(set(names.values())), skipped, fixed, examples)
