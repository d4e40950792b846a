"""A synthetic saliency set written as real files in the DUTS layout, for tests and the demo.

Each image has one clear subject (ellipse, rectangle, triangle, star or blob) anywhere in the
frame, plus a few smaller mid-tone distractors that are not in the mask. Masks are 0/255 PNGs, so
the same builder reads this set and the real DUTS.

Two domains give the demo a distribution shift to fine-tune across: ``plain`` (a bright flat
subject on a dark, near-flat or gradient background) and ``cluttered`` (a dark striped subject on
bright low-contrast stripes, checkers or gradients, with more distractors). A model trained on one
looks for the wrong kind of region in the other.

For the list tasks, :func:`write_synthetic_coco` writes images with several named shapes (ellipse,
rectangle, triangle, star; each category its own hue, the domain its brightness) and a COCO instances
file, the format detection tools export.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from tqdm.auto import trange

logger = logging.getLogger(__name__)
Domain = Literal["plain", "cluttered"]
SHAPES = ("ellipse", "rectangle", "triangle", "star", "blob")


# Colour ranges per domain: (background, subject, distractors). The subject always stands out in
# brightness, which a tiny model can learn in minutes; the domains flip which way it stands out.
PALETTES = {
    "plain": ((0, 90), (160, 256), (70, 140)),  # bright subject on a dark background
    "cluttered": ((150, 256), (0, 90), (90, 170)),  # dark striped subject on bright textured backgrounds
}


def _colour(rng: np.random.Generator, bounds: tuple[int, int]) -> np.ndarray:
    return rng.integers(bounds[0], bounds[1], 3).astype(float)


def _background(rng: np.random.Generator, h: int, w: int, domain: Domain) -> np.ndarray:
    """Near-flat colours or gradients (plain); low-contrast stripes, checkers or gradients (cluttered)."""
    low, high = PALETTES[domain][0]
    base = _colour(rng, (low, high))
    other = np.clip(base + rng.integers(-40, 41, 3), low, high - 1)  # close to base: texture, not objects
    kind = rng.choice(["flat", "gradient"] if domain == "plain" else ["stripes", "checker", "gradient"])
    noise = rng.normal(0, 5 if domain == "plain" else 8, (h, w, 3))
    if kind == "flat":
        img = base + noise
    elif kind == "gradient":
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h)
        t = t[None, :, None] if t.size == w else t[:, None, None]
        img = np.broadcast_to(base * (1 - t) + other * t, (h, w, 3)) + noise
    elif kind == "stripes":
        period = int(rng.integers(8, 40))
        stripes = ((np.arange(w)[None, :] + np.arange(h)[:, None] * rng.integers(0, 2)) // period) % 2
        img = np.where(stripes[..., None] == 1, base, other) + noise
    else:
        size = int(rng.integers(12, 48))
        checker = ((np.arange(w)[None, :] // size) + (np.arange(h)[:, None] // size)) % 2
        img = np.where(checker[..., None] == 1, base, other) + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, h: int, w: int, cx: int, cy: int, rx: int, ry: int,
                shape: str | None = None) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    shape = shape or rng.choice(SHAPES)
    if shape == "ellipse":
        cv2.ellipse(mask, (cx, cy), (rx, ry), float(rng.uniform(0, 180)), 0, 360, 255, -1)
    elif shape == "rectangle":
        cv2.rectangle(mask, (cx - rx, cy - ry), (cx + rx, cy + ry), 255, -1)
    else:
        n = {"triangle": 3, "star": 10, "blob": 12}[str(shape)]
        angles = np.sort(rng.uniform(0, 2 * np.pi, n)) if shape == "blob" else np.linspace(0, 2 * np.pi, n, False)
        radius = np.ones(n)
        if shape == "star":
            radius[1::2] = 0.45
        elif shape == "blob":
            radius = rng.uniform(0.6, 1.0, n)
        points = np.stack([cx + rx * radius * np.cos(angles), cy + ry * radius * np.sin(angles)], 1)
        cv2.fillPoly(mask, [points.astype(np.int32)], 255)
    return mask


def _paint(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, colour: np.ndarray, textured: bool) -> None:
    fill = np.broadcast_to(colour, img.shape).astype(float)
    if textured:
        period = int(rng.integers(4, 12))
        stripes = ((np.arange(img.shape[1])[None, :] + np.arange(img.shape[0])[:, None]) // period) % 2
        fill = fill * (0.75 + 0.25 * stripes[..., None])
    region = mask > 0
    img[region] = np.clip(fill[region] + rng.normal(0, 6, (int(region.sum()), 3)), 0, 255).astype(np.uint8)


def make_sample(rng: np.random.Generator, domain: Domain = "plain") -> tuple[np.ndarray, np.ndarray]:
    """One RGB image and its 0/255 subject mask."""
    _, subject_colours, distractor_colours = PALETTES[domain]
    w, h = int(rng.integers(256, 417)), int(rng.integers(192, 321))
    img = _background(rng, h, w, domain)
    scale = rng.uniform(0.12, 0.4)
    rx, ry = int(w * scale * rng.uniform(0.6, 1.0)), int(h * scale * rng.uniform(0.6, 1.0))
    cx = int(rng.uniform(rx, w - rx))
    cy = int(rng.uniform(ry, h - ry))
    subject = _shape_mask(rng, h, w, cx, cy, rx, ry)
    for _ in range(int(rng.integers(0, 3 if domain == "plain" else 5))):
        dr = max(4, int(min(rx, ry) * rng.uniform(0.15, 0.35)))
        dx, dy = int(rng.integers(dr, w - dr)), int(rng.integers(dr, h - dr))
        distractor = _shape_mask(rng, h, w, dx, dy, dr, dr) & ~subject
        _paint(img, distractor, rng, _colour(rng, distractor_colours), textured=False)
    _paint(img, subject, rng, _colour(rng, subject_colours), textured=domain == "cluttered")
    return img, subject


def write_synthetic_set(
    output_dir: str | Path,
    n: int = 300,
    seed: int = 0,
    domain: Domain = "plain",
    name: str = "DUTS-TR",
    prefix: str = "synth",
) -> Path:
    """Write ``n`` images and masks to ``output_dir/<name>/<name>-Image|-Mask`` (the DUTS layout)."""
    root = Path(output_dir) / name
    image_dir, mask_dir = root / f"{name}-Image", root / f"{name}-Mask"
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in trange(n, desc=f"Writing {domain} images", unit="img"):
        img, mask = make_sample(rng, domain)
        stem = f"{prefix}_{seed}_{i:06d}"
        cv2.imwrite(str(image_dir / f"{stem}.jpg"), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        cv2.imwrite(str(mask_dir / f"{stem}.png"), mask)
    logger.info("wrote %d %s images to %s", n, domain, root)
    return root


def write_example_images(output_dir: str | Path, n: int = 4, seed: int = 4, domain: Domain = "cluttered"
                         ) -> list[Path]:
    """``n`` images (no masks) for a page's examples, written only where missing; their paths."""
    output_dir = Path(output_dir)
    paths = [output_dir / f"example_{domain}_{seed}_{i}.jpg" for i in range(n)]
    if all(p.is_file() for p in paths):
        return paths
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for path in paths:
        img, _ = make_sample(rng, domain)
        cv2.imwrite(str(path), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
    return paths


# --- objects: several named shapes per image, as a COCO instances file -------------------------

OBJECT_LABELS = ("ellipse", "rectangle", "triangle", "star")
# Each category has its own hue, as real categories have their own looks; the domain sets how bright
# it is (bright on dark for plain, dark and striped on bright for cluttered), as for the subject.
OBJECT_HUES = {"ellipse": 0, "rectangle": 60, "triangle": 120, "star": 25}  # OpenCV hue, 0..179


def _label_colour(rng: np.random.Generator, label: str, domain: Domain, vivid: bool = False) -> np.ndarray:
    low, high = PALETTES[domain][1]
    hue = (OBJECT_HUES[label] + int(rng.integers(-6, 7))) % 180
    # Moderate saturation keeps the shapes bright in luminance too (a saturated blue is about as dark as
    # the background): with saturated hues the tiny demo model had not begun to read the image in 600 steps.
    # ``vivid`` (refer): the value at the domain's extreme, so every shape stands out as the subject does.
    value = (int(rng.integers(215, 256)) if low > 100 else int(rng.integers(10, 60))) if vivid else int(
        rng.integers(max(low, 40), high))
    hsv = np.array([[[hue, int(rng.integers(110, 171)), value]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(float)


def make_objects_sample(rng: np.random.Generator, domain: Domain = "plain", max_objects: int = 4,
                        min_objects: int = 0, scale: tuple[float, float] = (0.08, 0.22), vivid: bool = False
                        ) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int]]]]:
    """One RGB image with ``min_objects``..``max_objects`` named shapes that do not touch (fewer where
    no free place is found), and their COCO boxes (``[x, y, w, h]`` in pixels, the tight box of each
    painted shape). ``scale``: the range of each shape's half-size as a fraction of the image side."""
    w, h = int(rng.integers(256, 417)), int(rng.integers(192, 321))
    img = _background(rng, h, w, domain)
    taken = np.zeros((h, w), bool)
    objects = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        for _attempt in range(20):  # a free place for the shape, with a margin around it
            size = rng.uniform(*scale)
            rx, ry = int(w * size * rng.uniform(0.7, 1.0)), int(h * size * rng.uniform(0.7, 1.0))
            cx, cy = int(rng.uniform(rx, w - rx)), int(rng.uniform(ry, h - ry))
            label = str(rng.choice(OBJECT_LABELS))
            mask = _shape_mask(rng, h, w, cx, cy, rx, ry, shape=label)
            grown = cv2.dilate(mask, np.ones((9, 9), np.uint8)) > 0
            if mask.any() and not (grown & taken).any():
                break
        else:
            continue
        taken |= grown
        _paint(img, mask, rng, _label_colour(rng, label, domain, vivid), textured=domain == "cluttered")
        objects.append((label, tuple(int(v) for v in cv2.boundingRect(mask))))
    return img, objects


def write_synthetic_coco(output_dir: str | Path, n: int = 300, seed: int = 0, domain: Domain = "plain",
                         max_objects: int = 4, min_objects: int = 0, scale: tuple[float, float] = (0.08, 0.22)
                         ) -> Path:
    """``n`` images under ``output_dir/images`` and their ``output_dir/annotations.json`` (COCO instances)."""
    root = Path(output_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(OBJECT_LABELS)]
    ids = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for i in trange(n, desc=f"Writing {domain} object images", unit="img"):
        img, objects = make_objects_sample(rng, domain, max_objects, min_objects, scale)
        name = f"objects_{seed}_{i:06d}.jpg"
        cv2.imwrite(str(root / "images" / name), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        images.append({"id": i + 1, "file_name": name, "width": img.shape[1], "height": img.shape[0]})
        for label, (x, y, bw, bh) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": ids[label],
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                       "categories": categories}))
    logger.info("wrote %d %s images with %d objects to %s", n, domain, len(annotations), root)
    return root


# --- refer: several named shapes per image, each described by its attributes ---------------------

COLOUR_NAMES = {"ellipse": "red", "rectangle": "green", "triangle": "blue", "star": "yellow"}  # OBJECT_HUES


def describe(objects: list[tuple[str, tuple[int, int, int, int]]], index: int, rng: np.random.Generator) -> str:
    """A referring expression for ``objects[index]`` from its attributes: colour, shape, and the size or
    position that tells it from the other shapes of its kind ("the small red ellipse", "the star on the
    left"); the colour is left out at times (the shape names it too)."""
    label, (x, y, w, h) = objects[index]
    colour = f"{COLOUR_NAMES[label]} " if rng.random() < 0.6 else ""
    same = [box for i, (other, box) in enumerate(objects) if other == label and i != index]
    if not same:
        return f"the {colour}{label}"
    area, areas = w * h, [bw * bh for _, _, bw, bh in same]
    if area > 1.5 * max(areas):
        return f"the large {colour}{label}"
    if 1.5 * area < min(areas):
        return f"the small {colour}{label}"
    cx, cy = x + w / 2, y + h / 2
    centres = [(bx + bw / 2, by + bh / 2) for bx, by, bw, bh in same]
    gaps = {"on the left": min(ox for ox, _ in centres) - cx, "on the right": cx - max(ox for ox, _ in centres),
            "at the top": min(oy for _, oy in centres) - cy, "at the bottom": cy - max(oy for _, oy in centres)}
    where = max(gaps, key=gaps.get)
    return f"the {colour}{label} {where}" if gaps[where] > 0 else f"the {colour}{label} in the middle"


def write_synthetic_refer(output_dir: str | Path, n: int = 300, seed: int = 0, domain: Domain = "plain",
                          max_objects: int = 3, min_objects: int = 2, scale: tuple[float, float] = (0.14, 0.3)
                          ) -> Path:
    """``n`` images with ``min_objects``..``max_objects`` shapes under ``output_dir/images``, and
    ``output_dir/refs.jsonl``: one line per shape with its expression and COCO box (``[x, y, w, h]`` px).
    At least two shapes per image (fewer only where no free place was found), so the expression matters."""
    root = Path(output_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in trange(n, desc=f"Writing {domain} refer images", unit="img"):
        img, objects = make_objects_sample(rng, domain, max_objects, min_objects, scale, vivid=True)
        name = f"refer_{seed}_{i:06d}.jpg"
        cv2.imwrite(str(root / "images" / name), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        for k, (_, box) in enumerate(objects):
            lines.append(json.dumps({"image": f"images/{name}", "expression": describe(objects, k, rng),
                                     "bbox": list(box)}))
    (root / "refs.jsonl").write_text("\n".join(lines) + "\n")
    logger.info("wrote %d %s images with %d expressions to %s", n, domain, len(lines), root)
    return root


SYNTHETIC_WRITERS = {"saliency": write_synthetic_set, "detection": write_synthetic_coco, "refer": write_synthetic_refer}


def write_synthetic(sources: tuple[str, ...], output_dir: str | Path, n: int = 300, seed: int = 0,
                    domain: Domain = "plain", **shapes) -> Path:
    """A synthetic set in the first of a task's data ``sources`` that has a writer; ``shapes`` (max_objects,
    min_objects, scale) go to the writers of several shapes per image, None meaning their default."""
    source = next(s for s in sources if s in SYNTHETIC_WRITERS)
    options = {k: v for k, v in shapes.items() if v is not None} if source != "saliency" else {}
    return SYNTHETIC_WRITERS[source](output_dir, n=n, seed=seed, domain=domain, **options)
