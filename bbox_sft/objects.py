"""Lists of labelled boxes: the answers of the ``objects`` and ``phrase`` tasks.

``subject`` (one box, :mod:`bbox_sft.task`) stays the default. The two list tasks answer with every
object, or every object of the category the prompt names, in one fixed order (by ``x_min``, then
``y_min``, ``x_max``, ``y_max``, label, all on the written grid), so that one image has exactly one
right answer text:

- ``json``: ``[{"label": "cat", "x_min": 0.13, "y_min": 0.22, "x_max": 0.54, "y_max": 0.78}, ...]``
- ``qwen``: ``[{"bbox_2d": [130, 220, 540, 780], "label": "cat"}, ...]`` (Qwen-VL's own grounding list)

and ``[]`` when there is none. :func:`parse_objects` reads either back and never raises.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from .boxes import Box
from .task import DECIMALS, JSON_KEYS, QWEN_GRID, QWEN_KEY, AnswerFormat, _box_from_object, grid_values

Task = Literal["subject", "objects", "phrase"]
TASKS: tuple[str, ...] = ("subject", "objects", "phrase")
OBJECTS_INSTRUCTION = "Find every object and output a JSON list of labelled bounding boxes."
PHRASE_INSTRUCTION = "Find every {label} and output JSON bounding boxes."
MAX_OBJECTS = 20


class LabelledBox(NamedTuple):
    """One object: its category name and its box, normalised to [0, 1]."""

    label: str
    box: Box


def phrase_instruction(label: str) -> str:
    """The ``phrase`` task's request for one category."""
    return PHRASE_INSTRUCTION.format(label=label)


def _grid(obj: LabelledBox, answer_format: AnswerFormat) -> list[int]:
    return grid_values(obj.box, 10**DECIMALS if answer_format == "json" else QWEN_GRID)


def ordered(objects: Sequence[LabelledBox], answer_format: AnswerFormat = "json") -> list[LabelledBox]:
    """``objects`` in answer order: by the written x_min, y_min, x_max, y_max, then label."""
    return sorted(objects, key=lambda o: (*_grid(o, answer_format), o.label))


def format_objects(objects: Sequence[LabelledBox], answer_format: AnswerFormat = "json") -> str:
    """The exact answer text for ``objects`` (in answer order); ``[]`` for none."""
    items = []
    for obj in ordered(objects, answer_format):
        label = json.dumps(obj.label, ensure_ascii=False)
        values = _grid(obj, answer_format)
        if answer_format == "json":
            scale = 10**DECIMALS
            coords = ", ".join(f'"{k}": {v / scale:.{DECIMALS}f}' for k, v in zip(JSON_KEYS, values))
            items.append('{"label": ' + label + ", " + coords + "}")
        elif answer_format == "qwen":
            items.append('{"' + QWEN_KEY + '": [' + ", ".join(map(str, values)) + '], "label": ' + label + "}")
        else:
            raise ValueError(f"answer format must be json or qwen, got {answer_format!r}")
    return "[" + ", ".join(items) + "]"


def _labelled(obj: Any) -> LabelledBox | None:
    box = _box_from_object(obj)
    if box is None or not isinstance(obj.get("label"), str):
        return None
    return LabelledBox(obj["label"], box)


def parse_objects(text: str) -> list[LabelledBox] | None:
    """The labelled boxes in model output, or ``None`` when there is no list to read; never raises.

    Reads the first JSON list in ``text`` (code fences and prose around it do not matter) and keeps
    its items that hold a label and a box in either format. An answer cut short (no closing
    bracket) keeps the objects written in full before the cut.
    """
    if not isinstance(text, str):
        return None
    decoder = json.JSONDecoder()
    start = text.find("[")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            value = None
        if isinstance(value, list) and (not value or any(isinstance(v, dict) for v in value)):
            return [obj for obj in map(_labelled, value) if obj is not None]
        start = text.find("[", start + 1)
    salvaged, start = [], text.find("{")  # a truncated list: the complete objects before the cut
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if (obj := _labelled(value)) is not None:
            salvaged.append(obj)
        start = text.find("{", end)
    return salvaged or None
