"""Box metrics: mean / median IoU, Success@0.5 and @0.75, and parse rate, one function used everywhere.

An answer that does not parse counts as IoU 0 and as a parse failure, never as an exception.

The same computation is also an ``evaluate`` metric, for users who combine metrics with
``evaluate.combine`` or log them the ``evaluate`` way::

    import evaluate, bbox_sft.metrics
    box_iou = evaluate.load(bbox_sft.metrics.__file__)
    box_iou.compute(predictions=['{"x_min": 0.1, ...}'], references=[[0.1, 0.2, 0.5, 0.6]])
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
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


class BoxIoU(evaluate.Metric):
    """``evaluate`` wrapper of :func:`text_metrics`: predictions are answer texts, references boxes."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="IoU of predicted and true boxes; unparseable answers score 0.",
            citation="",
            inputs_description="predictions: model answers (str); references: [x_min, y_min, x_max, y_max] in [0, 1]",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("float64"))}
            ),
        )

    def _compute(self, predictions: list[str], references: list[list[float]]) -> dict[str, float]:
        return text_metrics(predictions, references)
