"""Reading one image/mask pair: every way it can be bad is either handled or named, never raised.

:func:`check_pair` is the per-file work of a dataset build (it runs in worker processes), and
:func:`load_image` gives the pixels a record stores, so both agree on orientation and colour mode.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image, ImageOps

from ..boxes import Box, BoxMode, mask_to_box

EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the image upright (as PIL's ImageOps.exif_transpose).
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass
class PairCheck:
    """The outcome for one pair: a box, or the reason it was skipped; ``handled`` lists fixes applied."""

    box: Box | None = None
    width: int = 0
    height: int = 0
    skip: str | None = None
    detail: str = ""
    handled: list[str] = field(default_factory=list)
    reencode: bool = False  # stored pixels differ from the file's: re-encode instead of copying bytes


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is not a broken image
        return 1


def load_image(path: str) -> Image.Image:
    """The image upright and in RGB, as it is stored in the dataset."""
    with Image.open(path) as image:
        image.load()
        if _orientation(image) in ORIENTATION_TRANSPOSE:
            image = ImageOps.exif_transpose(image)
        return image.convert("RGB") if image.mode != "RGB" else image.copy()


def image_bytes(path: str, reencode: bool) -> bytes:
    """What the ``image`` column stores: the file's own bytes, or a PNG of the converted pixels.

    Bytes, not paths, so a saved dataset does not depend on the source folder (or an extracted
    archive in a temporary cache) still being there.
    """
    if not reencode:
        with open(path, "rb") as f:
            return f.read()
    buffer = io.BytesIO()
    load_image(path).save(buffer, format="PNG")
    return buffer.getvalue()


def check_pair(
    image_path: str,
    mask_path: str | None,
    threshold: int = 128,
    box_mode: BoxMode = "largest",
    min_fraction: float = 0.25,
) -> PairCheck:
    """Open, decode and measure one pair; compute its box."""
    result = PairCheck()
    if mask_path is None:
        result.skip, result.detail = "missing_mask", "no mask with this image's file stem"
        return result
    try:
        with Image.open(image_path) as image:
            image.load()  # decode fully: truncated files fail here, not during training
            width, height = image.size
            orientation = _orientation(image)
            mode = image.mode
    except Exception as error:  # PIL raises many types for bad files
        result.skip, result.detail = "unreadable_image", f"{type(error).__name__}: {error}"
        return result
    if mode != "RGB":
        result.handled.append(f"converted_{mode}_to_RGB")
        result.reencode = True
    transpose = ORIENTATION_TRANSPOSE.get(orientation)
    if transpose is not None:
        result.handled.append("exif_rotated")
        result.reencode = True
        if transpose in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE,
                         Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270):
            width, height = height, width

    mask = cv2.imread(mask_path, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        result.skip, result.detail = "unreadable_mask", "OpenCV could not decode the mask"
        return result
    if transpose is not None and mask.shape == (width, height) and width != height:
        # mask drawn on the stored (sideways) pixels: turn it the way the image is turned
        mask = np.asarray(Image.fromarray(mask).transpose(transpose))
    if mask.shape != (height, width):
        result.skip = "size_mismatch"
        result.detail = f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}"
        return result
    if 0 < mask.max() <= 1:  # 0/1 masks (some sets store them so)
        mask = mask * 255
        result.handled.append("mask_0_1")
    box = mask_to_box(mask, threshold=threshold, mode=box_mode, min_fraction=min_fraction)
    if box is None:
        result.skip, result.detail = "empty_mask", f"no mask pixel >= {threshold}"
        return result
    result.box, result.width, result.height = box, width, height
    return result
