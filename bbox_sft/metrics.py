"""Box metrics: mean / median IoU, Success@0.5 and @0.75, and parse rate, one function used everywhere.

An answer that does not parse counts as IoU 0 and as a parse failure, never as an exception.
The same computation as an ``evaluate`` metric is :mod:`bbox_sft.iou_metric` (kept apart: importing
``evaluate`` costs every process seconds, and training, synth and prepare need none of it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bbox_sft.boxes import iou
from bbox_sft.formats import parse_answer

METRIC_NAMES = ("mean_iou", "median_iou", "success@0.5", "success@0.75", "parse_rate")


def box_metrics(
    predictions: Sequence[Sequence[float] | None],
    references: Sequence[Sequence[float]],
) -> dict[str, float]:
    """Metrics of predicted boxes (``None`` where the answer did not parse) against the true boxes."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return {name: 0.0 for name in METRIC_NAMES}
    ious = np.array([iou(p, r) for p, r in zip(predictions, references)])
    return {
        "mean_iou": float(ious.mean()),
        "median_iou": float(np.median(ious)),
        "success@0.5": float((ious >= 0.5).mean()),
        "success@0.75": float((ious >= 0.75).mean()),
        "parse_rate": float(np.mean([p is not None for p in predictions])),
    }


def text_metrics(answers: Sequence[str], references: Sequence[Sequence[float]]) -> dict[str, float]:
    """:func:`box_metrics` of raw model answers (parsed tolerantly)."""
    return box_metrics([parse_answer(a) for a in answers], references)
