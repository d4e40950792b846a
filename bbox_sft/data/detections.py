"""What every detection reader gives: images with their labelled boxes, and every box not kept, by reason.

A detection export (COCO JSON, YOLO text files, Pascal VOC XML, a ``datasets`` detection set) is
read by its :class:`Layout` in two steps: first the image files it names (so the builder can check
and measure them all, in parallel), then the boxes, normalised by the measured upright sizes. A box
that cannot be used is never dropped silently; it is counted under one reason:

- ``bad_bbox``: not four finite numbers (or a line/element that cannot be read as a box);
- ``zero_area``: no width or height;
- ``outside_image``: nothing of it inside the image;
- ``crowd``: COCO ``iscrowd: 1`` regions (a crowd, not one object);
- ``unknown_category``: a category id the export does not name;
- ``no_label``: a VOC object whose name is empty or blank;
- ``unknown_image``: an annotation of an image the export does not list;
- ``image_skipped``: its image is missing or unreadable (the image's own reason is in the report);
- ``unreadable_annotation``: in an annotation file that cannot be parsed (its boxes cannot be counted:
  the file is counted in ``unreadable_files``).

``clipped_to_image`` is a fix, not a loss: a box reaching outside the image is cut to it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..boxes import Box
from ..formats import LabelledBox


@dataclass(frozen=True)
class DetectionImage:
    """One image with its usable objects (boxes normalised to [0, 1]) and its boxes lost, by reason."""

    image_id: str
    path: str
    width: int
    height: int
    objects: tuple[LabelledBox, ...]
    lost: tuple[tuple[str, int], ...] = ()


@dataclass
class DetectionAnnotations:
    """What one annotation source holds once checked: images, the category names it declares (in its
    order), boxes lost that belong to no listed image, fixes, and one example per reason."""

    images: list[DetectionImage]
    categories: list[str]
    skipped: Counter = field(default_factory=Counter)  # every box lost, by reason (the images' own included)
    fixed: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    unreadable_files: list[dict[str, str]] = field(default_factory=list)

    def skip(self, reason: str, example: Any, n: int = 1) -> None:
        self.skipped[reason] += n
        self.examples.setdefault(reason, str(example)[:200])

    def add(self, image_id: str, path: str, size: tuple[int, int] | None, objects: list[LabelledBox],
            lost: Counter) -> None:
        """One image read: its kept ``objects`` and its ``lost`` boxes by reason (``size`` None: skipped)."""
        width, height = size or (0, 0)
        self.images.append(DetectionImage(image_id, path, width, height, tuple(objects), tuple(sorted(lost.items()))))


def finite_numbers(values: Any, n: int = 4) -> list[float] | None:
    """``values`` as ``n`` finite floats (JSON numbers or numeric strings), or None."""
    if not isinstance(values, (list, tuple)) or len(values) != n:
        return None
    numbers = []
    for value in values:
        if isinstance(value, bool):
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(number):
            return None
        numbers.append(number)
    return numbers


def pixel_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> tuple[Box | None, str | None]:
    """The normalised box of pixel edges ``x0 < x1``, ``y0 < y1`` on a ``width`` x ``height`` image, or the
    reason there is none; the note ``clipped_to_image`` when it was cut to the image."""
    if x1 <= x0 or y1 <= y0:
        return None, "zero_area"
    cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
    if cx1 <= cx0 or cy1 <= cy0:
        return None, "outside_image"
    clipped = (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
    return Box(cx0 / width, cy0 / height, cx1 / width, cy1 / height), "clipped_to_image" if clipped else None


def coco_box(bbox: Any, width: int, height: int) -> tuple[Box | None, str | None]:
    """The normalised box of a COCO ``[x, y, w, h]`` in pixels, or the reason there is none."""
    numbers = finite_numbers(bbox) if isinstance(bbox, list) else None
    if numbers is None or any(isinstance(v, str) for v in bbox):
        return None, "bad_bbox"
    x, y, w, h = numbers
    if w <= 0 or h <= 0:
        return None, "zero_area"
    return pixel_box(x, y, x + w, y + h, width, height)


class Layout(ABC):
    """One annotation source of an export (one split, or all of an unsplit export) in one tool's layout."""

    name: ClassVar[str]
    description: ClassVar[str]  # what a user would see in the folder, for the message when nothing is found

    @classmethod
    @abstractmethod
    def find(cls, folder: Path) -> Layout | None:
        """This layout in ``folder``, or None."""

    @property
    @abstractmethod
    def source(self) -> str:
        """The annotation file or folder read, for the report."""

    @abstractmethod
    def image_paths(self) -> list[str]:
        """Every image file the source names, to be checked and measured before its boxes are read."""

    @abstractmethod
    def read(self, sizes: dict[str, tuple[int, int]]) -> DetectionAnnotations:
        """The images and boxes, normalised by ``sizes`` (path -> measured upright width, height); an image
        missing from ``sizes`` was skipped, and its boxes are counted as ``image_skipped``."""
