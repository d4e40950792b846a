"""Box math and answer formats: property tests against plain references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bbox_sft.boxes import Box, box_from_pixels, iou, mask_to_box
from bbox_sft.formats import format_answer, parse_answer, quantize

unit = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def boxes(draw) -> Box:
    x0, x1 = sorted((draw(unit), draw(unit)))
    y0, y1 = sorted((draw(unit), draw(unit)))
    return Box(x0, y0, x1, y1)


@given(boxes(), boxes())
def test_iou_is_symmetric_and_bounded(a: Box, b: Box) -> None:
    assert iou(a, b) == pytest.approx(iou(b, a))
    assert 0.0 <= iou(a, b) <= 1.0


@given(boxes())
def test_iou_of_a_box_with_itself_is_one(a: Box) -> None:
    assume(a.area > 1e-9)
    assert iou(a, a) == pytest.approx(1.0)


def test_iou_known_values() -> None:
    assert iou((0, 0, 0.5, 1), (0.5, 0, 1, 1)) == 0.0
    assert iou((0, 0, 1, 1), (0, 0, 0.5, 0.5)) == pytest.approx(0.25)
    assert iou((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(1 / 7)
    assert iou(None, (0, 0, 1, 1)) == 0.0


@given(boxes(), st.sampled_from(["json", "qwen"]))
def test_format_then_parse_round_trips(box: Box, answer_format: str) -> None:
    unit = 0.01 if answer_format == "json" else 0.001
    rounded = [round(v / unit) * unit for v in box]
    parsed = parse_answer(format_answer(box, answer_format))
    assert parsed is not None
    assert parsed.x_max - parsed.x_min >= unit - 1e-9 and parsed.y_max - parsed.y_min >= unit - 1e-9
    if rounded[2] > rounded[0] and rounded[3] > rounded[1]:  # wide enough on the grid: just rounded
        assert parsed == pytest.approx(rounded, abs=1e-9)
    else:  # thinner than one unit: widened by one unit, never more
        assert all(abs(p - r) <= unit + 1e-9 for p, r in zip(parsed, rounded))
    assert quantize(box, answer_format) == parsed


def test_a_box_thinner_than_the_grid_is_widened_inside_the_image() -> None:
    assert format_answer((0.5, 0.2, 0.501, 0.2)) == '{"x_min": 0.50, "y_min": 0.20, "x_max": 0.51, "y_max": 0.21}'
    assert format_answer((1.0, 0.0, 1.0, 0.0004), "qwen") == '{"bbox_2d": [999, 0, 1000, 1]}'


def test_answer_texts_are_exact() -> None:
    box = (0.13, 0.22, 0.54, 0.78)
    assert format_answer(box) == '{"x_min": 0.13, "y_min": 0.22, "x_max": 0.54, "y_max": 0.78}'
    assert format_answer(box, "qwen") == '{"bbox_2d": [130, 220, 540, 780]}'


@pytest.mark.parametrize(
    "text, expected",
    [
        ('```json\n{"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}\n```', (0.1, 0.2, 0.3, 0.4)),
        ('Sure! {"y_max": 0.4, "x_max": 0.3, "y_min": 0.2, "x_min": 0.1} done', (0.1, 0.2, 0.3, 0.4)),
        ('{"x_min": 0.5, "y_min": 0.6, "x_max": 0.1, "y_max": 0.2}', (0.1, 0.2, 0.5, 0.6)),
        ('{"x_min": -0.2, "y_min": 0.1, "x_max": 1.4, "y_max": 0.9}', (0.0, 0.1, 1.0, 0.9)),
        ('{"note": 1} {"x_min": 0, "y_min": 0, "x_max": 1, "y_max": 1}', (0.0, 0.0, 1.0, 1.0)),
        ('[{"bbox_2d": [100, 200, 300, 400], "label": "cat"}]', (0.1, 0.2, 0.3, 0.4)),
        ('{"x_min": NaN, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}', None),
        ('{"x_min": Infinity, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}', None),
        ('{"x_min": 0.1, "y_min": 0.2, "x_max": 0.3}', None),
        ('{"x_min": "0.1", "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}', None),
        ('{"x_min": true, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}', None),
        ('{"bbox_2d": [1, 2, 3]}', None),
        ('{"x_min": 0.1, "y_min": 0.2, "x_', None),
        ("no box here", None),
        ("", None),
    ],
)
def test_parser_is_tolerant_and_never_raises(text: str, expected) -> None:
    parsed = parse_answer(text)
    if expected is None:
        assert parsed is None
    else:
        assert parsed == pytest.approx(expected)


@settings(max_examples=300)
@given(st.text())
def test_parser_never_raises_on_any_text(text: str) -> None:
    parsed = parse_answer(text)
    assert parsed is None or (0 <= parsed.x_min <= parsed.x_max <= 1 and 0 <= parsed.y_min <= parsed.y_max <= 1)


# --- mask -> box against a brute-force reference -------------------------------------------


def _components(fg: np.ndarray) -> list[np.ndarray]:
    """8-connected components by flood fill, as (N, 2) arrays of (row, col), in scan order."""
    seen = np.zeros_like(fg, dtype=bool)
    out = []
    h, w = fg.shape
    for r0, c0 in zip(*np.nonzero(fg)):
        if seen[r0, c0]:
            continue
        stack, cells = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            cells.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w and fg[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        out.append(np.array(cells))
    return out


def _reference_box(mask: np.ndarray, threshold: int, mode: str, min_fraction: float):
    comps = _components(mask >= threshold)
    if not comps:
        return None
    areas = [len(c) for c in comps]
    if mode == "largest":
        keep = [comps[int(np.argmax(areas))]]
    elif mode == "union":
        keep = comps
    else:
        keep = [c for c, a in zip(comps, areas) if a >= min_fraction * max(areas)]
    cells = np.concatenate(keep)
    h, w = mask.shape
    return (cells[:, 1].min() / w, cells[:, 0].min() / h, (cells[:, 1].max() + 1) / w, (cells[:, 0].max() + 1) / h)


@settings(max_examples=150, deadline=None)
@given(
    arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24)), elements=st.sampled_from([0, 90, 128, 255])),
    st.sampled_from(["largest", "union", "components"]),
    st.sampled_from([0.1, 0.25, 0.5]),
)
def test_mask_to_box_matches_brute_force(mask: np.ndarray, mode: str, min_fraction: float) -> None:
    expected = _reference_box(mask, 128, mode, min_fraction)
    got = mask_to_box(mask, threshold=128, mode=mode, min_fraction=min_fraction)
    if expected is None:
        assert got is None
        return
    if mode == "largest":
        areas = sorted((len(c) for c in _components(mask >= 128)), reverse=True)
        assume(len(areas) == 1 or areas[0] != areas[1])  # ties: either component is right
    assert got == pytest.approx(expected)


def test_full_mask_is_the_unit_box_and_empty_mask_has_none() -> None:
    assert mask_to_box(np.full((30, 40), 255, np.uint8)) == (0.0, 0.0, 1.0, 1.0)
    assert mask_to_box(np.zeros((30, 40), np.uint8)) is None
    assert mask_to_box(np.full((30, 40), 127, np.uint8)) is None


def test_largest_component_ignores_a_far_speck() -> None:
    mask = np.zeros((100, 100), np.uint8)
    mask[20:60, 30:70] = 255
    mask[95:97, 2:4] = 255
    assert mask_to_box(mask) == pytest.approx((0.3, 0.2, 0.7, 0.6))
    assert mask_to_box(mask, mode="union") == pytest.approx((0.02, 0.2, 0.7, 0.97))
    assert mask_to_box(mask, mode="components") == pytest.approx((0.3, 0.2, 0.7, 0.6))


def test_box_pixels_round_trip() -> None:
    box = Box(0.25, 0.5, 0.75, 1.0)
    assert box.to_pixels(400, 300) == (100, 150, 300, 300)
    assert math.isclose(box.area, 0.25)


@given(st.integers(1, 5000), st.integers(1, 5000), st.data())
def test_pixel_edges_of_a_box_from_pixels_are_those_pixels(width: int, height: int, data) -> None:
    x0 = data.draw(st.integers(0, width - 1))
    x1 = data.draw(st.integers(x0 + 1, width))
    y0 = data.draw(st.integers(0, height - 1))
    y1 = data.draw(st.integers(y0 + 1, height))
    assert box_from_pixels(x0, y0, x1, y1, width, height).to_pixels(width, height) == (x0, y0, x1, y1)


@given(boxes(), st.integers(1, 50), st.integers(1, 50))
def test_a_non_empty_box_covers_at_least_one_pixel(box: Box, width: int, height: int) -> None:
    x0, y0, x1, y1 = box.to_pixels(width, height)
    assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
    assert (x1 > x0) == (box.x_max > box.x_min) and (y1 > y0) == (box.y_max > box.y_min)
    if box.x_max > box.x_min:  # it covers the box
        assert x0 <= box.x_min * width + 1e-6 and x1 >= box.x_max * width - 1e-6
