"""Box geometry: boxes from saliency masks, IoU, and pixel <-> normalised conversion.

Boxes are ``(x_min, y_min, x_max, y_max)`` tuples normalised to [0, 1] with the pixel-edge
convention: a component whose left column is ``x0`` and width ``w`` spans ``[x0 / W, (x0 + w) / W]``,
so the whole image is exactly ``(0, 0, 1, 1)``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import cv2
import numpy as np

BoxMode = Literal["largest", "union", "components"]
BOX_MODES: tuple[str, ...] = ("largest", "union", "components")


class Box(NamedTuple):
    """A normalised box; a tuple, so it serialises as a plain list of four floats."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    @property
    def area(self) -> float:
        return max(0.0, self.x_max - self.x_min) * max(0.0, self.y_max - self.y_min)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x_min + self.x_max) / 2, (self.y_min + self.y_max) / 2)

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Pixel edges ``(x0, y0, x1, y1)`` of the pixels the box covers; the inverse of :func:`box_from_pixels`.

        A box that covers part of a pixel covers that pixel, so a non-empty box is at least one pixel
        wide and high even on a tiny image (a 1x1 image's box is ``(0, 0, 1, 1)``).
        """
        def edges(lo: float, hi: float, size: int) -> tuple[int, int]:
            a = min(max(math.floor(lo * size + 1e-6), 0), size)
            if hi <= lo:
                return a, a
            b = min(max(math.ceil(hi * size - 1e-6), a + 1), size)
            return (a - 1, b) if a == b else (a, b)

        x0, x1 = edges(self.x_min, self.x_max, width)
        y0, y1 = edges(self.y_min, self.y_max, height)
        return x0, y0, x1, y1


def box_from_pixels(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> Box:
    """Normalise pixel edges by the image size."""
    return Box(x0 / width, y0 / height, x1 / width, y1 / height)


def iou(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> float:
    """Intersection over union of two boxes; 0 when either is missing or both are empty."""
    if a is None or b is None:
        return 0.0
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(min(1.0, inter / union)) if union > 0 else 0.0


def mask_to_box(
    mask: np.ndarray,
    threshold: int = 128,
    mode: BoxMode = "largest",
    min_fraction: float = 0.25,
) -> Box | None:
    """Box of the main subject of a saliency mask, or ``None`` if nothing is foreground.

    Foreground is ``mask >= threshold``, split into 8-connected components:

    - ``largest``: the box of the largest component (ties go to the first in scan order);
    - ``union``: the box of all foreground pixels;
    - ``components``: the box around every component whose area is at least ``min_fraction`` of
      the largest one's, so a speck of noise or one small statue of three does not stretch it.
    """
    if mode not in BOX_MODES:
        raise ValueError(f"box mode must be one of {BOX_MODES}, got {mode!r}")
    if mask.ndim == 3:
        mask = mask[..., 0]
    height, width = mask.shape
    binary = (mask >= threshold).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return None
    stats = stats[1:]  # row 0 is the background
    areas = stats[:, cv2.CC_STAT_AREA]
    if mode == "largest":
        keep = stats[[int(np.argmax(areas))]]
    elif mode == "union":
        keep = stats
    else:
        keep = stats[areas >= min_fraction * areas.max()]
    x0 = keep[:, cv2.CC_STAT_LEFT]
    y0 = keep[:, cv2.CC_STAT_TOP]
    x1 = x0 + keep[:, cv2.CC_STAT_WIDTH]
    y1 = y0 + keep[:, cv2.CC_STAT_HEIGHT]
    return box_from_pixels(x0.min(), y0.min(), x1.max(), y1.max(), width, height)


def mask_to_boxes(mask: np.ndarray, threshold: int = 128, min_fraction: float = 0.25) -> list[Box]:
    """One box per 8-connected foreground component whose area is at least ``min_fraction`` of the
    largest one's (the ``objects`` task read from a saliency mask); ``[]`` if nothing is foreground."""
    if mask.ndim == 3:
        mask = mask[..., 0]
    height, width = mask.shape
    count, _, stats, _ = cv2.connectedComponentsWithStats((mask >= threshold).astype(np.uint8), connectivity=8)
    if count <= 1:
        return []
    stats = stats[1:]
    areas = stats[:, cv2.CC_STAT_AREA]
    return [box_from_pixels(x, y, x + w, y + h, width, height)
            for x, y, w, h, area in stats[:, :5] if area >= min_fraction * areas.max()]
