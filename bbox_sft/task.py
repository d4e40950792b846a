"""What the model is asked and how it answers: the one place training, evaluation and prediction share.

Two answer formats:

- ``json`` (default): ``{"x_min": 0.13, "y_min": 0.22, "x_max": 0.54, "y_max": 0.78}``, normalised
  to [0, 1] with :data:`DECIMALS` decimals;
- ``qwen``: Qwen-VL's native grounding format ``{"bbox_2d": [130, 220, 540, 780]}`` on a 0-1000
  integer grid, which the pretrained model already speaks, so fine-tuning may converge faster.

:func:`parse_answer` reads either back from model output and never raises.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from .boxes import Box

AnswerFormat = Literal["json", "qwen"]
ANSWER_FORMATS: tuple[str, ...] = ("json", "qwen")
INSTRUCTION = "Find the main subject and output a JSON bounding box."
DECIMALS = 2
QWEN_GRID = 1000
JSON_KEYS = ("x_min", "y_min", "x_max", "y_max")
QWEN_KEY = "bbox_2d"


def grid_values(box: tuple[float, float, float, float], top: int) -> list[int]:
    """The box on the integer grid 0..``top``: ordered, and at least one unit wide and high.

    A box thinner than the grid's unit would round to zero width; it is widened by one unit (towards
    the inside of the image), so every answer is a box the constrained grammar can write.
    """
    values = [int(round(min(max(float(v), 0.0), 1.0) * top)) for v in box]
    for lo, hi in ((0, 2), (1, 3)):
        a, b = sorted((values[lo], values[hi]))
        if a == b:
            a, b = (a, b + 1) if b < top else (a - 1, b)
        values[lo], values[hi] = a, b
    return values


def format_answer(box: tuple[float, float, float, float], answer_format: AnswerFormat = "json") -> str:
    """The exact answer text the model is trained to write for ``box``."""
    if answer_format == "json":
        scale = 10**DECIMALS
        values = ", ".join(f'"{key}": {v / scale:.{DECIMALS}f}' for key, v in zip(JSON_KEYS, grid_values(box, scale)))
        return "{" + values + "}"
    if answer_format == "qwen":
        grid = ", ".join(str(v) for v in grid_values(box, QWEN_GRID))
        return '{"' + QWEN_KEY + '": [' + grid + "]}"
    raise ValueError(f"answer format must be one of {ANSWER_FORMATS}, got {answer_format!r}")


def quantize(box: tuple[float, float, float, float], answer_format: AnswerFormat = "json") -> Box:
    """The box as the answer text can express it (what ``parse_answer(format_answer(box))`` gives)."""
    parsed = parse_answer(format_answer(box, answer_format))
    assert parsed is not None, "format_answer wrote an answer parse_answer cannot read"
    return parsed


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _box_from_object(obj: Any) -> Box | None:
    if not isinstance(obj, dict):
        return None
    if all(key in obj for key in JSON_KEYS):
        values = [_number(obj[key]) for key in JSON_KEYS]
        scale = 1.0
    elif isinstance(obj.get(QWEN_KEY), list) and len(obj[QWEN_KEY]) == 4:
        values = [_number(v) for v in obj[QWEN_KEY]]
        scale = float(QWEN_GRID)
    else:
        return None
    if any(v is None for v in values):
        return None
    x0, y0, x1, y1 = (min(1.0, max(0.0, v / scale)) for v in values)  # type: ignore[operator]
    return Box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def parse_answer(text: str) -> Box | None:
    """The box in model output, or ``None``; never raises.

    Takes the first JSON object in ``text`` that holds a box in either answer format, so code
    fences, surrounding prose, key order and a list around the object do not matter. Values are
    clamped to [0, 1] and swapped corners put in order; NaN, infinities, non-numbers and missing
    keys give ``None``.
    """
    if not isinstance(text, str):
        return None
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except ValueError:
            obj = None
        box = _box_from_object(obj)
        if box is not None:
            return box
        start = text.find("{", start + 1)
    return None


# Qwen-VL's own grounding request, in the words of its cookbooks ("Locate the top right brown cake,
# output its bbox coordinates using JSON format."): the base model's zero-shot baseline.
NATIVE_GROUNDING_INSTRUCTION = "Locate the main subject of the image, output its bbox coordinates using JSON format."
_NATIVE_BOX = re.compile(r'"bbox_2d"\s*:\s*\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]')


def parse_native_grounding(text: str, pick: Literal["first", "largest"] = "first") -> Box | None:
    """A box from Qwen3-VL's native grounding answer, or ``None``; never raises.

    Takes what Qwen3-VL writes when asked in its own words: a JSON list (often in a code fence) of
    ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` on a 0-1000 grid, a single such object, or
    truncated / slightly malformed JSON (every ``"bbox_2d": [...]`` is read where it stands).
    With several objects ``pick`` says which: the first written, or the largest.
    """
    if not isinstance(text, str):
        return None
    boxes = []
    for match in _NATIVE_BOX.finditer(text):
        try:
            values = [float(v) for v in match.groups()]
        except ValueError:
            continue
        if not all(math.isfinite(v) for v in values):
            continue
        x0, y0, x1, y1 = (min(1.0, max(0.0, v / QWEN_GRID)) for v in values)
        box = Box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        if box.area > 0:
            boxes.append(box)
    if not boxes:
        return None
    return boxes[0] if pick == "first" else max(boxes, key=lambda b: b.area)


def prompt_messages(instruction: str = INSTRUCTION) -> list[dict[str, Any]]:
    """The user turn: one image placeholder, then the instruction (TRL's vision prompt format)."""
    return [
        {
            "role": "user",
            "content": [{"type": "image", "text": None}, {"type": "text", "text": instruction}],
        }
    ]


def completion_messages(answer: str) -> list[dict[str, Any]]:
    """The assistant turn holding the answer text."""
    return [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
