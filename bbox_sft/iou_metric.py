"""The box metrics of :mod:`bbox_sft.metrics` as an ``evaluate`` metric, for users who combine metrics with
``evaluate.combine`` or log them the ``evaluate`` way::

    import evaluate, bbox_sft.iou_metric
    box_iou = evaluate.load(bbox_sft.iou_metric.__file__)
    box_iou.compute(predictions=['{"x_min": 0.1, ...}'], references=[[0.1, 0.2, 0.5, 0.6]])
"""

from __future__ import annotations

import datasets
import evaluate

from bbox_sft.metrics import text_metrics


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
