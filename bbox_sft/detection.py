"""Metrics of lists of labelled boxes (the ``objects`` and ``phrase`` tasks), from maintained libraries.

Per image, predicted and true boxes of the same label are matched one-to-one by the Hungarian
algorithm on IoU (``scipy.optimize.linear_sum_assignment``); a pair with IoU >= 0.5 is a true
positive. Summed over images: precision, recall, F1. COCO mAP@[.5:.95] and AP50 come from
``torchmetrics``' ``MeanAveragePrecision`` (its pycocotools backend), with per-box scores where
the model gives them (1.0 otherwise). An answer that does not parse predicts no boxes and counts
against the parse rate; the count error rate is the share of images with a wrong number of boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .boxes import iou
from .formats import LabelledBox

if TYPE_CHECKING:
    import torch

DETECTION_METRIC_NAMES = ("precision@0.5", "recall@0.5", "f1@0.5", "map", "map_50", "count_error_rate",
                          "parse_rate")


def matched(predicted: Sequence[LabelledBox], truth: Sequence[LabelledBox]) -> list[tuple[int, int, float]]:
    """(prediction index, truth index, IoU) of the one-to-one assignment of largest total IoU, same label only
    (the Hungarian algorithm); pairs that do not overlap are left out."""
    from scipy.optimize import linear_sum_assignment

    if not predicted or not truth:
        return []
    overlap = np.array([[iou(p.box, t.box) if p.label == t.label else 0.0 for t in truth] for p in predicted])
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    return [(int(r), int(c), float(overlap[r, c])) for r, c in zip(rows, cols) if overlap[r, c] > 0]


def match(predicted: Sequence[LabelledBox], truth: Sequence[LabelledBox], threshold: float = 0.5
          ) -> list[tuple[int, int]]:
    """Pairs (prediction index, truth index) matched one-to-one, same label, IoU >= ``threshold``."""
    return [(r, c) for r, c, overlap in matched(predicted, truth) if overlap >= threshold]


def list_reward(predicted: Sequence[LabelledBox] | None, truth: Sequence[LabelledBox], bonus: float = 0.0) -> float:
    """How good one list answer is, for reinforcement learning: the IoU of each box matched one-to-one with a true box
    of its label, summed, over the longer of the two lists; so a missing box and an extra one each cost a share,
    and a redundant box (a second answer for a box already matched) never raises it. An empty answer where there is
    nothing is 1. With ``bonus``, each match of IoU >= 0.5 adds ``bonus`` over the same count. Unparsed: 0."""
    if predicted is None:
        return 0.0
    if not predicted and not truth:
        return 1.0
    pairs = matched(predicted, truth)
    longest = max(len(predicted), len(truth))
    return (sum(o for _, _, o in pairs) + bonus * sum(o >= 0.5 for _, _, o in pairs)) / longest


def detection_metrics(
    predictions: Sequence[Sequence[LabelledBox] | None],
    references: Sequence[Sequence[LabelledBox]],
    scores: Sequence[Sequence[float] | None] | None = None,
) -> dict[str, float]:
    """The metrics of :data:`DETECTION_METRIC_NAMES` over images (``None``: an answer that did not parse)."""
    from torchmetrics.detection import MeanAveragePrecision

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return {name: 0.0 for name in DETECTION_METRIC_NAMES}
    scores = scores if scores is not None else [None] * len(predictions)
    labels = {name: i for i, name in enumerate(sorted({o.label for objs in (*predictions, *references)
                                                       for o in (objs or ())}))}
    tp = n_pred = n_true = wrong_count = 0
    preds, targets = [], []
    for predicted, truth, score in zip(predictions, references, scores):
        predicted = list(predicted or [])
        tp += len(match(predicted, truth))
        n_pred, n_true = n_pred + len(predicted), n_true + len(truth)
        wrong_count += len(predicted) != len(truth)
        preds.append(_as_tensors(predicted, labels, score if score is not None else [1.0] * len(predicted)))
        targets.append(_as_tensors(truth, labels))
    precision = tp / n_pred if n_pred else float(n_true == 0)
    recall = tp / n_true if n_true else float(n_pred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    average = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    average.update(preds, targets)
    computed = average.compute()
    return {
        "precision@0.5": precision,
        "recall@0.5": recall,
        "f1@0.5": f1,
        "map": max(0.0, float(computed["map"])),  # -1 means "no boxes at all": nothing found, nothing to find
        "map_50": max(0.0, float(computed["map_50"])),
        "count_error_rate": wrong_count / len(references),
        "parse_rate": float(np.mean([p is not None for p in predictions])),
    }


def _as_tensors(objects: Sequence[LabelledBox], labels: dict[str, int], scores: Sequence[float] | None = None
                ) -> dict[str, torch.Tensor]:
    import torch  # torchmetrics' inputs (imported where used: prepare and synth need no torch)

    item = {
        "boxes": torch.tensor([list(o.box) for o in objects], dtype=torch.float64).reshape(-1, 4),
        "labels": torch.tensor([labels[o.label] for o in objects], dtype=torch.long),
    }
    if scores is not None:
        item["scores"] = torch.tensor(list(scores), dtype=torch.float64)
    return item
