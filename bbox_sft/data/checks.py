"""Reading one image/mask pair: every way it can be bad is either handled or named, never raised.

:func:`check_pair` is the per-file work of a dataset build (it runs in worker processes), and
:func:`~bbox_sft.images.load_image` gives the pixels a record stores, so both agree on orientation and colour mode.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from ..boxes import Box, BoxMode, mask_to_box, mask_to_boxes
from ..images import ORIENTATION_TRANSPOSE, SIDEWAYS, load_image, orientation, processor_problem


@dataclass
class PairCheck:
    """The outcome for one pair: a box, or the reason it was skipped; ``handled`` lists fixes applied."""

    box: Box | None = None
    boxes: list[Box] = field(default_factory=list)  # every component kept (the objects task)
    width: int = 0
    height: int = 0
    skip: str | None = None
    detail: str = ""
    handled: list[str] = field(default_factory=list)
    reencode: bool = False  # stored pixels differ from the file's: re-encode instead of copying bytes
    transpose: Image.Transpose | None = None  # EXIF turn from the stored pixels to the upright image


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


def check_image(image_path: str) -> PairCheck:
    """Open and fully decode one image: its upright size and the fixes it needs, or why it is skipped."""
    result = PairCheck()
    try:
        with Image.open(image_path) as image:
            image.load()  # decode fully: truncated files fail here, not during training
            width, height = image.size
            transpose = ORIENTATION_TRANSPOSE.get(orientation(image))
            mode = image.mode
            animated = getattr(image, "n_frames", 1) > 1
    except Image.DecompressionBombError as error:
        result.skip, result.detail = "too_many_pixels", f"over PIL's pixel limit: {error}"
        return result
    except FileNotFoundError as error:
        result.skip, result.detail = "missing_file", f"no such file: {error.filename}"
        return result
    except Exception as error:  # PIL raises many types for bad files
        result.skip, result.detail = "unreadable_image", f"{type(error).__name__}: {error}"
        return result
    problem = processor_problem(width, height)
    if problem is not None:  # it would stop training or evaluation when the batch holding it comes
        result.skip, result.detail = "processor_limit", problem
        return result
    if mode != "RGB":
        result.handled.append(f"converted_{mode}_to_RGB")
        result.reencode = True
    if animated:
        result.handled.append("animated_first_frame")
        result.reencode = True
    if transpose is not None:
        result.handled.append("exif_rotated")
        result.reencode = True
        if transpose in SIDEWAYS:
            width, height = height, width
    result.width, result.height, result.transpose = width, height, transpose
    return result


def check_pair(
    image_path: str,
    mask_path: str | None,
    threshold: int = 128,
    box_mode: BoxMode = "largest",
    min_fraction: float = 0.25,
) -> PairCheck:
    """Open, decode and measure one pair; compute its box."""
    if mask_path is None:
        return PairCheck(skip="missing_mask", detail="no mask with this image's file stem")
    result = check_image(image_path)
    if result.skip is not None:
        return result
    width, height, transpose = result.width, result.height, result.transpose
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
    result.boxes = mask_to_boxes(mask, threshold=threshold, min_fraction=min_fraction)
    if box is None:
        result.skip, result.detail = "empty_mask", f"no mask pixel >= {threshold}"
        return result
    result.box, result.width, result.height = box, width, height
    return result
