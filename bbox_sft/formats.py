"""Answer formats: how a box, or a list of labelled boxes, is written as text, and read back.

Two formats, one object each, and the one definition of each layout: the formatter, the parsers'
expectations and the constrained-decoding grammars (:mod:`bbox_sft.grammar`) all read it from here.

- ``json`` (default): ``{"x_min": 0.13, "y_min": 0.22, "x_max": 0.54, "y_max": 0.78}``, normalised
  to [0, 1] with :data:`DECIMALS` decimals; a list item is ``{"label": "cat", "x_min": ...}``;
- ``qwen``: Qwen-VL's native grounding format ``{"bbox_2d": [130, 220, 540, 780]}`` on a 0-1000
  integer grid, which the pretrained model already speaks; a list item is
  ``{"bbox_2d": [...], "label": "cat"}``.

An answer is *pieces*: fixed text (connectors) around numbers. A box is ``head(None)``, four numbers
joined by :attr:`AnswerFormat.inner`, ``tail(None)``; a list is ``[`` + items (``head(label)``, numbers,
``tail(label)``) joined by ``", "`` + ``]``, ``[]`` for none. Lists are written in one fixed order (by
the written x_min, y_min, x_max, y_max, then label), so one image has exactly one right answer text.

:func:`parse_answer` and :func:`parse_objects` read either format back from model output and never raise.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from .boxes import Box

DECIMALS = 2
JSON_KEYS = ("x_min", "y_min", "x_max", "y_max")
QWEN_KEY = "bbox_2d"
QWEN_GRID = 1000
DIGITS = "0123456789"
LIST_OPEN, LIST_SEPARATOR, LIST_CLOSE = "[", ", ", "]"


class LabelledBox(NamedTuple):
    """One object: its category name and its box, normalised to [0, 1]."""

    label: str
    box: Box


def grid_values(box: Sequence[float], top: int) -> list[int]:
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


class AnswerFormat:
    """One way of writing boxes as text: the grid, the numbers' spelling, and the fixed text around them."""

    name: str
    top: int  # the largest number on the answer's integer grid
    inner: tuple[str, str, str]  # the text between an item's four numbers
    label_in_tail: bool  # whether an item's label follows its numbers (else it precedes them)

    def head(self, label: str | None) -> str:
        """The text before an item's first number (``label`` None: a lone box)."""
        raise NotImplementedError

    def tail(self, label: str | None) -> str:
        """The text after an item's last number."""
        raise NotImplementedError

    def number(self, value: int) -> str:
        """Grid value ``value`` as written."""
        raise NotImplementedError

    def number_options(self, chars: str, low: int, high: int) -> tuple[str, bool]:
        """(characters that may come next, whether the number may end here) for a number in [low, high]
        whose characters so far are ``chars``: the spelling rules constrained decoding follows."""
        raise NotImplementedError

    # --- writing ---------------------------------------------------------------------------------

    def item_pieces(self, box: Sequence[float], label: str | None = None) -> list[str]:
        """``[head, number, inner, number, inner, number, inner, number, tail]`` for one item."""
        numbers = [self.number(v) for v in grid_values(box, self.top)]
        pieces = [self.head(label)]
        for k, text in enumerate(numbers):
            pieces += [text, self.inner[k] if k < 3 else self.tail(label)]
        return pieces

    def box_pieces(self, box: Sequence[float]) -> list[str]:
        """The answer for one box as pieces: connectors at even places, numbers at odd ones."""
        return self.item_pieces(box)

    def box_text(self, box: Sequence[float]) -> str:
        """The exact answer text the model is trained to write for ``box``."""
        return "".join(self.box_pieces(box))

    def ordered(self, objects: Sequence[LabelledBox]) -> list[LabelledBox]:
        """``objects`` in answer order: by the written x_min, y_min, x_max, y_max, then label."""
        return sorted(objects, key=lambda o: (*grid_values(o.box, self.top), o.label))

    def list_pieces(self, objects: Sequence[LabelledBox]) -> list[str]:
        """The answer for a list as pieces (connectors at even places, numbers at odd ones): the
        connectors between items join one item's tail, the separator and the next item's head."""
        objects = self.ordered(objects)
        if not objects:
            return [LIST_OPEN + LIST_CLOSE]
        pieces = [LIST_OPEN]
        for i, obj in enumerate(objects):
            item = self.item_pieces(obj.box, json.dumps(obj.label, ensure_ascii=False))
            pieces[-1] += (LIST_SEPARATOR if i else "") + item[0]
            pieces += item[1:]
        pieces[-1] += LIST_CLOSE
        return pieces

    def objects_text(self, objects: Sequence[LabelledBox]) -> str:
        """The exact answer text for ``objects`` (in answer order); ``[]`` for none."""
        return "".join(self.list_pieces(objects))

    def quantize(self, box: Sequence[float]) -> Box:
        """The box as the answer text can express it (what ``parse_answer(box_text(box))`` gives)."""
        parsed = parse_answer(self.box_text(box))
        assert parsed is not None, "box_text wrote an answer parse_answer cannot read"
        return parsed

    def __repr__(self) -> str:
        return f"AnswerFormat({self.name!r})"


class JsonFormat(AnswerFormat):
    """``{"x_min": 0.13, ...}`` with two decimals: every number is ``d.dd`` (three digits and a dot)."""

    name, top, label_in_tail = "json", 10**DECIMALS, False
    inner = tuple(f', "{key}": ' for key in JSON_KEYS[1:])  # type: ignore[assignment]

    def head(self, label: str | None) -> str:
        return "{" + (f'"label": {label}, ' if label is not None else "") + f'"{JSON_KEYS[0]}": '

    def tail(self, label: str | None) -> str:
        return "}"

    def number(self, value: int) -> str:
        return f"{value / self.top:.{DECIMALS}f}"

    def number_options(self, chars: str, low: int, high: int) -> tuple[str, bool]:
        digits = chars.replace(".", "")
        if len(chars) == 1:
            return ".", False
        if len(digits) == DECIMALS + 1:
            return "", True
        return "".join(c for c in DIGITS if self._feasible(digits + c, low, high)), False

    @staticmethod
    def _feasible(digits: str, low: int, high: int) -> bool:
        """Whether a number that starts with ``digits`` can still end in [low, high] (exactly three digits)."""
        span = 10 ** (DECIMALS + 1 - len(digits))
        start = int(digits) * span
        return start <= high and start + span - 1 >= low


class QwenFormat(AnswerFormat):
    """``{"bbox_2d": [130, 220, 540, 780]}``: integers 0-1000, 1-4 digits without leading zeros."""

    name, top, label_in_tail = "qwen", QWEN_GRID, True
    inner = (", ", ", ", ", ")

    def head(self, label: str | None) -> str:
        return '{"' + QWEN_KEY + '": ['

    def tail(self, label: str | None) -> str:
        return "]" + (f', "label": {label}' if label is not None else "") + "}"

    def number(self, value: int) -> str:
        return str(value)

    def number_options(self, chars: str, low: int, high: int) -> tuple[str, bool]:
        grows = len(chars) < 4 and chars != "0"
        options = "".join(c for c in DIGITS if self._feasible(chars + c, low, high)) if grows else ""
        return options, bool(chars) and low <= int(chars) <= high

    @staticmethod
    def _feasible(digits: str, low: int, high: int) -> bool:
        if len(digits) > 1 and digits[0] == "0":
            return False
        for extra in range(0, 5 - len(digits)) if digits != "0" else (0,):
            span = 10**extra
            start = int(digits) * span
            if start <= high and start + span - 1 >= low:
                return True
        return False


FORMATS: dict[str, AnswerFormat] = {f.name: f for f in (JsonFormat(), QwenFormat())}
ANSWER_FORMATS: tuple[str, ...] = tuple(FORMATS)
AnswerFormatName = Literal["json", "qwen"]


def get_format(answer_format: str | AnswerFormat) -> AnswerFormat:
    """The format object for a name (or the object itself)."""
    if isinstance(answer_format, AnswerFormat):
        return answer_format
    if answer_format not in FORMATS:
        raise ValueError(f"answer format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    return FORMATS[answer_format]


def format_answer(box: Sequence[float], answer_format: str | AnswerFormat = "json") -> str:
    """The exact answer text for one box (:meth:`AnswerFormat.box_text`)."""
    return get_format(answer_format).box_text(box)


def format_objects(objects: Sequence[LabelledBox], answer_format: str | AnswerFormat = "json") -> str:
    """The exact answer text for a list (:meth:`AnswerFormat.objects_text`)."""
    return get_format(answer_format).objects_text(objects)


def quantize(box: Sequence[float], answer_format: str | AnswerFormat = "json") -> Box:
    """:meth:`AnswerFormat.quantize`."""
    return get_format(answer_format).quantize(box)


def ordered(objects: Sequence[LabelledBox], answer_format: str | AnswerFormat = "json") -> list[LabelledBox]:
    """:meth:`AnswerFormat.ordered`."""
    return get_format(answer_format).ordered(objects)


# --- reading ---------------------------------------------------------------------------------------


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
