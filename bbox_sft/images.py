"""Any image a user has, turned into what a Qwen2/3-VL processor takes: upright 8-bit RGB, small, a shape it accepts.

What stops a run or fills memory, and what happens to it here:

- an aspect ratio over :data:`MAX_ASPECT_RATIO` (the processor's ``smart_resize`` raises): the image is
  padded with its mean colour up to that ratio (:func:`pad_to_aspect_ratio`), and the box the model
  gives is mapped back to the original frame with the :class:`Letterbox`;
- 16-bit, 32-bit, palette, CMYK, alpha, animated (first frame): converted to 8-bit RGB (:func:`to_rgb`);
- photos of 12-24 MP: decoded small (JPEG draft mode scales by 1/2-1/8 while decoding) and shrunk at
  once to the size the processor would resize them to anyway (:func:`open_image`), so memory holds
  thumbnails, not photos;
- more pixels than PIL's decompression-bomb limit: refused with that reason (:class:`ImageError`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from .boxes import Box

# Qwen2-VL's ``smart_resize`` (used by Qwen2.5-VL and Qwen3-VL too) refuses max(h, w) / min(h, w) > 200.
MAX_ASPECT_RATIO = 200
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
SIDEWAYS = (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
            Image.Transpose.ROTATE_270)


class ImageError(ValueError):
    """An image file that cannot be used, with the reason (``reason`` is a short key for reports)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 when absent or unreadable)."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is not a broken image
        return 1


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: high bit depths scaled down (PIL's own ``convert`` clips 16-bit to white), the rest converted."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):  # transparent pixels on white, not on whatever colour they hold
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def processor_size(processor) -> tuple[int, int, int]:
    """(factor, min_pixels, max_pixels) of a Qwen2/3-VL image processor."""
    ip = processor.image_processor
    return ip.patch_size * ip.merge_size, ip.size["shortest_edge"], ip.size["longest_edge"]


def target_size(width: int, height: int, processor) -> tuple[int, int]:
    """(width, height) the processor resizes an image of this size to (after padding to a ratio it takes)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    factor, min_pixels, max_pixels = processor_size(processor)
    width, height = padded_size(width, height)
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


def padded_size(width: int, height: int, max_ratio: float = MAX_ASPECT_RATIO) -> tuple[int, int]:
    """The smallest size holding a ``width`` x ``height`` image with an aspect ratio of at most ``max_ratio``."""
    if width > max_ratio * height:
        return width, math.ceil(width / max_ratio)
    if height > max_ratio * width:
        return math.ceil(height / max_ratio), height
    return width, height


@dataclass(frozen=True)
class Letterbox:
    """Where an image sits inside its padded copy, to map boxes between the two frames."""

    width: int
    height: int
    left: int
    top: int
    padded_width: int
    padded_height: int

    def to_original(self, box: Box) -> Box:
        """A normalised box in the padded image -> the same pixels, normalised in the original (clipped)."""
        def axis(lo: float, hi: float, size: int, offset: int, padded: int) -> tuple[float, float]:
            a = min(max((lo * padded - offset) / size, 0.0), 1.0)
            b = min(max((hi * padded - offset) / size, 0.0), 1.0)
            return a, b

        x0, x1 = axis(box[0], box[2], self.width, self.left, self.padded_width)
        y0, y1 = axis(box[1], box[3], self.height, self.top, self.padded_height)
        return Box(x0, y0, x1, y1)

    def to_padded(self, box: Box) -> Box:
        """A normalised box in the original -> normalised in the padded image."""
        return Box((box[0] * self.width + self.left) / self.padded_width,
                   (box[1] * self.height + self.top) / self.padded_height,
                   (box[2] * self.width + self.left) / self.padded_width,
                   (box[3] * self.height + self.top) / self.padded_height)


def pad_to_aspect_ratio(image: Image.Image, max_ratio: float = MAX_ASPECT_RATIO
                        ) -> tuple[Image.Image, Letterbox | None]:
    """``image`` centred on its mean colour with an aspect ratio of at most ``max_ratio``; None if it already is."""
    width, height = image.size
    padded_width, padded_height = padded_size(width, height, max_ratio)
    if (padded_width, padded_height) == (width, height):
        return image, None
    rgb = to_rgb(image)
    fill = tuple(int(round(c)) for c in np.asarray(rgb, dtype=np.float64).reshape(-1, 3).mean(0))
    canvas = Image.new("RGB", (padded_width, padded_height), fill)
    left, top = (padded_width - width) // 2, (padded_height - height) // 2
    canvas.paste(rgb, (left, top))
    return canvas, Letterbox(width, height, left, top, padded_width, padded_height)


def open_image(source: str | Path | bytes | BinaryIO, processor=None) -> tuple[Image.Image, tuple[int, int]]:
    """The image upright in 8-bit RGB, and its upright size as stored.

    With ``processor``, an image larger than the processor's target is decoded small (JPEG draft)
    and resized to exactly that target, so the processor does not resize it again; smaller images
    are left as they are. Raises :class:`ImageError` (with a reason) for what cannot be read.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as opened:
            image = opened
            turn = ORIENTATION_TRANSPOSE.get(orientation(image))
            stored_w, stored_h = image.size
            width, height = (stored_h, stored_w) if turn in SIDEWAYS else (stored_w, stored_h)
            target = target_size(width, height, processor) if processor is not None else None
            shrink = target is not None and target[0] * target[1] < width * height
            if shrink and image.format == "JPEG":
                image.draft("RGB", (target[1], target[0]) if turn in SIDEWAYS else target)
            image.load()
            if turn is not None:
                image = image.transpose(turn)
            image = to_rgb(image)
            if shrink and not needs_padding(width, height):
                image = image.resize(target, Image.Resampling.BICUBIC)
            elif shrink:  # extreme ratios: keep the shape, the processor resizes after padding
                scale = math.sqrt(target[0] * target[1] / (width * height))
                image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                     Image.Resampling.BICUBIC)
            return (image.copy() if image is opened else image), (width, height)
    except Image.DecompressionBombError as error:
        raise ImageError("too_many_pixels", f"over PIL's pixel limit ({error})") from error
    except FileNotFoundError as error:
        raise ImageError("missing_file", f"no such file (or a dangling link): {error.filename}") from error
    except Exception as error:  # PIL raises many types for bad files
        raise ImageError("unreadable_image", f"{type(error).__name__}: {error}") from error


def needs_padding(width: int, height: int) -> bool:
    """Whether the processor would refuse this shape (aspect ratio over :data:`MAX_ASPECT_RATIO`)."""
    return padded_size(width, height) != (width, height)


def load_image(path: str | Path) -> Image.Image:
    """The whole image upright in 8-bit RGB (what a dataset record stores)."""
    return open_image(path)[0]


def processor_problem(width: int, height: int) -> str | None:
    """Why a Qwen2/3-VL processor would refuse an image of this size, or None."""
    if needs_padding(width, height):
        ratio = max(width, height) / min(width, height)
        return f"aspect ratio {ratio:.0f}:1 is over the processor's {MAX_ASPECT_RATIO}:1"
    return None
