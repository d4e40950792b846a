"""A box confidence that means something: P(IoU >= 0.5), calibrated on the validation split.

Constrained decoding gives, at every digit the model chose, its distribution over the allowed
digits; :func:`bbox_sft.decoding.box_spread` turns those into the spread of each coordinate. A
wide spread on a small box is a likely miss, a narrow one on a large box a likely hit, so the
probability of a hit is a logistic function of ``log(spread)`` and ``log(area)`` (Platt scaling with
two features): three numbers, fitted at the end of training on the validation split, saved beside
the adapter as ``box_confidence.json`` and pushed with it.

:func:`auroc` and :func:`expected_calibration_error` say how good that confidence is, and
:func:`save_reliability_plot` shows it. On a few hundred images ECE is noisy even for a perfect
confidence (a bin of 15 images with P = 0.75 misses its rate by 0.09 on average), so
:func:`chance_ece` says what a perfectly calibrated confidence would show on the same images.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .boxes import iou

logger = logging.getLogger(__name__)
CALIBRATION_FILE = "box_confidence.json"
HIT_IOU = 0.5
_EPS = 1e-4


def features(spread: float, box: Sequence[float]) -> np.ndarray:
    """[log spread, log area]: how unsure the digits were, and how much that matters for this box."""
    area = max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
    return np.array([math.log(spread + _EPS), math.log(area + _EPS)])


@dataclass
class Calibration:
    """P(IoU >= 0.5) = sigmoid(intercept + coef . features(spread, box))."""

    coef: list[float]
    intercept: float
    fitted_on: int
    hit_rate: float
    threshold: float = HIT_IOU

    def probability(self, spread: float | None, box: Sequence[float] | None) -> float | None:
        if spread is None or box is None:
            return None
        z = self.intercept + float(np.dot(self.coef, features(spread, box)))
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    @classmethod
    def fit(cls, spreads: Sequence[float], boxes: Sequence[Sequence[float]], hits: Sequence[bool],
            l2: float = 1e-2, iterations: int = 50) -> Calibration:
        """Logistic regression by Newton's method (a small L2 penalty keeps separable sets finite)."""
        if len(hits) == 0:
            raise ValueError("cannot calibrate on an empty set")
        x = np.stack([features(s, b) for s, b in zip(spreads, boxes)])
        y = np.asarray(hits, dtype=float)
        mean, std = x.mean(0), x.std(0) + 1e-9  # standardised features, mapped back at the end
        z = np.column_stack([np.ones(len(y)), (x - mean) / std])
        w = np.zeros(z.shape[1])
        penalty = l2 * np.diag([0.0, 1.0, 1.0])
        for _ in range(iterations):
            p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -30, 30)))
            grad = z.T @ (p - y) + penalty @ w
            hess = (z * (p * (1 - p))[:, None]).T @ z + penalty + 1e-9 * np.eye(len(w))
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        coef = w[1:] / std
        return cls(coef=coef.tolist(), intercept=float(w[0] - coef @ mean), fitted_on=len(y), hit_rate=float(y.mean()))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CALIBRATION_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Calibration | None:
        """The calibration saved beside an adapter, or None (then predictions carry no probability)."""
        path = Path(folder) / CALIBRATION_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


def fit_from_predictions(predictions, truths: Sequence[Sequence[float]]) -> Calibration | None:
    """Fit on generated predictions (with spreads) against the true boxes; None if nothing to fit on."""
    rows = [(p.spread, p.box, t) for p, t in zip(predictions, truths) if p.box is not None and p.spread is not None]
    if len(rows) < 2:
        logger.warning("box confidence not calibrated: %d usable validation predictions", len(rows))
        return None
    hits = [iou(box, truth) >= HIT_IOU for _, box, truth in rows]
    return Calibration.fit([s for s, _, _ in rows], [b for _, b, _ in rows], hits)


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve: P(a random hit scores above a random miss), ties counted half."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    positives, negatives = s[y], s[~y]
    if len(positives) == 0 or len(negatives) == 0:
        return None
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def reliability_bins(probs: Sequence[float], labels: Sequence[bool],
                     bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean confidence, hit rate, count) of each non-empty equal-width confidence bin."""
    p, y = np.asarray(probs, dtype=float), np.asarray(labels, dtype=float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    return [(float(p[which == b].mean()), float(y[which == b].mean()), int((which == b).sum()))
            for b in range(bins) if (which == b).any()]


def expected_calibration_error(probs: Sequence[float], labels: Sequence[bool], bins: int = 10) -> float:
    """Mean |hit rate - mean confidence| over equal-width confidence bins, weighted by bin size."""
    total = len(probs)
    if total == 0:
        return 0.0
    return sum(n / total * abs(rate - mean) for mean, rate, n in reliability_bins(probs, labels, bins))


def chance_ece(probs: Sequence[float], bins: int = 10, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """(mean, 90th percentile) of the ECE that a perfectly calibrated confidence shows on these images.

    Each image's outcome is drawn as a hit with probability equal to its confidence, ``draws`` times,
    with the bins of :func:`expected_calibration_error`: a measured ECE within this range is what
    chance alone gives on so few images, not evidence of miscalibration.
    """
    p = np.asarray(probs, dtype=float)
    if len(p) == 0:
        return 0.0, 0.0
    outcomes = np.random.default_rng(seed).random((draws, len(p))) < p  # draws x images
    which = np.minimum((p * bins).astype(int), bins - 1)
    ece = np.zeros(draws)
    for b in np.unique(which):
        members = which == b
        ece += members.sum() / len(p) * np.abs(outcomes[:, members].mean(1) - p[members].mean())
    return float(ece.mean()), float(np.quantile(ece, 0.9))


def confidence_metrics(probs: Sequence[float | None], ious: Sequence[float]) -> dict[str, float]:
    """``confidence_auroc``, ``confidence_ece`` of P(IoU >= 0.5) against the IoUs reached, and the ECE a
    perfectly calibrated confidence would show on as many images (``confidence_ece_chance``, its mean,
    and ``confidence_ece_chance_p90``)."""
    pairs = [(p, iou >= HIT_IOU) for p, iou in zip(probs, ious) if p is not None]
    if not pairs:
        return {}
    probs_, hits = [p for p, _ in pairs], [h for _, h in pairs]
    chance, chance_p90 = chance_ece(probs_)
    metrics = {"confidence_ece": expected_calibration_error(probs_, hits), "confidence_ece_chance": chance,
               "confidence_ece_chance_p90": chance_p90}
    area = auroc(probs_, hits)
    if area is not None:
        metrics["confidence_auroc"] = area
    return metrics


def save_reliability_plot(probs: Sequence[float], ious: Sequence[float], path: str | Path, bins: int = 10) -> Path:
    """Reliability diagram: hit rate per confidence bin against the diagonal, with bin counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hits = [iou >= HIT_IOU for iou in ious]
    binned = reliability_bins(probs, hits, bins)
    centers, rates, counts = [m for m, _, _ in binned], [r for _, r, _ in binned], [n for _, _, n in binned]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(centers, rates, "o-", color="tab:red", label="this model")
    for c, r, n in zip(centers, rates, counts):
        ax.annotate(str(n), (c, r), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("confidence: predicted P(IoU >= 0.5)")
    ax.set_ylabel("observed fraction with IoU >= 0.5")
    ece = expected_calibration_error(probs, hits, bins)
    area = auroc(probs, hits)
    ax.set_title(f"ECE {ece:.3f} (perfect, by chance: {chance_ece(probs, bins)[0]:.3f})"
                 + (f", AUROC {area:.3f}" if area is not None else ""), fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
