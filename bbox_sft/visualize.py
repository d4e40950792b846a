"""Pictures a person would rather look at than read: boxes drawn on images, grids of them, curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

GREEN = (40, 200, 60)
RED = (230, 40, 40)


TILE = 256  # the grid's cell: drawings are sized to read well at this size whatever the photo's size


def unit(image: Image.Image, tile: int = TILE) -> float:
    """Pixels of ``image`` that one pixel of a ``tile``-sized thumbnail shows (at least 1): line widths and
    text sizes are multiples of it, so a 4000 px photo's boxes are as legible in the grid as a 300 px one's."""
    return max(1.0, max(image.size) / tile)


def _font(size: float) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, round(size)))


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: tuple[int, int, int],
           scale: float) -> None:
    """``text`` in white on a ``colour`` box with its top left at ``xy``."""
    font = _font(10 * scale)
    x0, y0, x1, y1 = draw.textbbox(xy, text, font=font)
    pad = round(2 * scale)
    draw.rectangle([x0 - pad, y0 - pad, x1 + pad, y1 + pad], fill=colour)
    draw.text(xy, text, fill=(255, 255, 255), font=font)


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[tuple[tuple[float, ...] | None, tuple[int, int, int]]],
    width: int | None = None,
    caption: str | None = None,
) -> Image.Image:
    """A copy of ``image`` with each normalised ``(box, colour)`` drawn; ``None`` boxes are left out. Lines are
    ``width`` pixels, by default 3 pixels of a grid tile (:func:`unit`), as is the caption's size."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    w, h = image.size
    scale = unit(image)
    width = width or max(1, round(3 * scale))
    for box, colour in boxes:
        if box is not None:  # pixel edges: the last pixel inside is x_max * w - 1 (at least x_min * w)
            x0, y0 = box[0] * w, box[1] * h
            draw.rectangle([x0, y0, max(x0, box[2] * w - 1), max(y0, box[3] * h - 1)], outline=colour, width=width)
    if caption:
        _label(draw, (3 * scale, 2 * scale), caption, (0, 0, 0), scale)
    return image


def image_grid(images: Sequence[Image.Image], columns: int = 4, cell: int = TILE) -> Image.Image:
    """Images fitted into ``cell``-pixel squares, ``columns`` to a row."""
    rows = max(1, math.ceil(len(images) / columns))
    grid = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for i, image in enumerate(images):
        thumb = image.copy()
        thumb.thumbnail((cell - 4, cell - 4))
        x, y = (i % columns) * cell, (i // columns) * cell
        grid.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
    return grid


def save_box_grid(
    items: Sequence[tuple[Image.Image, tuple[float, ...] | None, tuple[float, ...] | None, str | None]],
    path: str | Path,
    columns: int = 4,
) -> Path:
    """Grid of ``(image, ground truth, prediction, caption)``: truth in green, prediction in red."""
    drawn = [draw_boxes(img, [(truth, GREEN), (pred, RED)], caption=cap) for img, truth, pred, cap in items]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(drawn, columns=columns).save(path)
    return path


def draw_objects(image: Image.Image, truth: Sequence, predicted: Sequence, caption: str | None = None) -> Image.Image:
    """``image`` with labelled boxes (``LabelledBox``): truth in green (its label at the top left inside the box),
    prediction in red (its label at the bottom left), sized to read in a grid tile (:func:`unit`)."""
    drawn = draw_boxes(image, [(o.box, GREEN) for o in truth] + [(o.box, RED) for o in predicted])
    draw = ImageDraw.Draw(drawn)
    w, h = drawn.size
    scale = unit(drawn)
    for obj in truth:
        _label(draw, (obj.box[0] * w + 4 * scale, obj.box[1] * h + 4 * scale), obj.label, GREEN, scale)
    for obj in predicted:
        _label(draw, (obj.box[0] * w + 4 * scale, obj.box[3] * h - 16 * scale), obj.label, RED, scale)
    if caption:  # last, over the labels
        _label(draw, (3 * scale, 2 * scale), caption, (0, 0, 0), scale)
    return drawn


def save_objects_grid(items: Sequence[tuple[Image.Image, Sequence, Sequence, str | None]], path: str | Path,
                      columns: int = 4) -> Path:
    """Grid of ``(image, true objects, predicted objects, caption)`` drawn with :func:`draw_objects`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid([draw_objects(*item) for item in items], columns=columns).save(path)
    return path


def save_training_curves(log_history: Sequence[dict], path: str | Path, metric: str = "eval_mean_iou",
                         name: str = "validation mean IoU", train_key: str = "loss", train_name: str = "training loss",
                         spread_key: str | None = None) -> Path:
    """PNG of a training quantity (``train_key`` of the logs: the loss, or GRPO's mean ``reward`` with its
    ``spread_key`` band) and a validation metric in [0, 1] (``metric``, shown as ``name``) over steps, from a
    Trainer's ``log_history``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e[train_key], e.get(spread_key, 0.0) if spread_key else 0.0) for e in log_history
             if train_key in e]
    evals = [(e["step"], e[metric]) for e in log_history if metric in e]
    fig, loss_axis = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, values, spread = (list(column) for column in zip(*train))
        loss_axis.plot(steps, values, color="tab:blue", label=train_name)
        if spread_key:
            loss_axis.fill_between(steps, [v - s for v, s in zip(values, spread)],
                                   [v + s for v, s in zip(values, spread)], color="tab:blue", alpha=0.15)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel(train_name + (" (band: ± its spread)" if spread_key else ""), color="tab:blue")
    metric_axis = loss_axis.twinx()
    if evals:
        metric_axis.plot(*zip(*evals), color="tab:red", marker="o", label=name)
    metric_axis.set_ylabel(name, color="tab:red")
    metric_axis.set_ylim(0, 1)
    fig.suptitle(f"{train_name} and generation-based validation")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
