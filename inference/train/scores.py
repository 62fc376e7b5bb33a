"""Binary classification metrics of the evaluation report and the model card.

scikit-learn computes the standard ones; calibration (reliability curve, expected calibration error)
is written here because sklearn has the curve but not the ECE, and the report needs both computed on
the same equal-width bins. Everything takes the positive-class probability and 0/1 truth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "roc_auc", "ece", "brier")
"""Order of the columns in the report and of the `cv_*` keys in the model card."""


def _check(y_true: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} entries but prob has {p.size}; pass one probability per case")
    if y.size and not set(np.unique(y)) <= {0, 1}:
        raise ValueError("y_true must hold 0/1 labels (1 = positive class)")
    if p.size and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
        raise ValueError("prob must hold probabilities in [0, 1]")
    return y, p


@dataclass(frozen=True)
class ReliabilityCurve:
    """Equal-width probability bins: mean predicted probability, observed positive rate, case count."""

    edges: np.ndarray  # [B + 1]
    confidence: np.ndarray  # [B], NaN for empty bins
    frequency: np.ndarray  # [B], NaN for empty bins
    counts: np.ndarray  # [B] int


def reliability_curve(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> ReliabilityCurve:
    """Bin cases by predicted probability (right-closed, 0 in the first bin) for the reliability diagram."""
    y, p = _check(y_true, prob)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, p, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, weights=p, minlength=n_bins) / counts
        frequency = np.bincount(which, weights=y, minlength=n_bins) / counts
    return ReliabilityCurve(edges, confidence, frequency, counts)


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> float:
    """Sum over bins of (bin share of cases) x |observed positive rate - mean predicted probability|.

    0 = perfectly calibrated; a model that says 0.8 for cases that are positive half the time scores
    0.3 on those cases. Empty bins contribute nothing.
    """
    curve = reliability_curve(y_true, prob, n_bins)
    total = int(curve.counts.sum())
    if total == 0:
        return math.nan
    used = curve.counts > 0
    gaps = np.abs(curve.frequency[used] - curve.confidence[used])
    return float(np.sum(curve.counts[used] / total * gaps))


def brier_score(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Mean squared difference between the probability and the 0/1 outcome: calibration and sharpness in
    one proper score (0 = perfect; 0.25 = always saying 0.5)."""
    y, p = _check(y_true, prob)
    return float(np.mean((p - y) ** 2)) if y.size else math.nan


def bootstrap_auc_ci(
    y_true: np.ndarray, prob: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the ROC-AUC (cases resampled with replacement; a
    resample with one class only is skipped). (NaN, NaN) when the AUC is undefined."""
    y, p = _check(y_true, prob)
    if len(np.unique(y)) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, y.size, (n_boot, y.size))
    yb, pb = y[pick], p[pick]
    n1 = yb.sum(axis=1)
    n0 = y.size - n1
    both = (n1 > 0) & (n0 > 0)
    # Mann-Whitney form of the AUC (average ranks for ties), every resample at once
    ranks = rankdata(pb[both], axis=1)
    values = ((ranks * yb[both]).sum(axis=1) - n1[both] * (n1[both] + 1) / 2) / (n1[both] * n0[both])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def confusion(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """2x2 counts [[TN, FP], [FN, TP]]: rows = truth (negative, positive), columns = prediction."""
    y, p = _check(y_true, prob)
    matrix: np.ndarray = confusion_matrix(y, (p >= threshold).astype(np.int64), labels=[0, 1])
    return matrix


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall, F1 at `threshold` (predict positive when p >= threshold), ROC-AUC, ECE.

    ROC-AUC is NaN when only one class is present (it is undefined, not 0.5); precision and F1 are 0
    when nothing is predicted positive, as sklearn's zero_division=0 says.
    """
    y, p = _check(y_true, prob)
    pred = (p >= threshold).astype(np.int64)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "roc_auc": float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else math.nan,
        "ece": expected_calibration_error(y, p),
        "brier": brier_score(y, p),
    }


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) ignoring NaN."""
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarise(per_fold: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """{metric: (mean, sd)} over folds, for every metric of METRIC_NAMES present in the folds."""
    names = [m for m in METRIC_NAMES if all(m in fold for fold in per_fold)]
    return {m: mean_sd([fold[m] for fold in per_fold]) for m in names}


def format_mean_sd(pair: tuple[float, float], digits: int = 3) -> str:
    mean, sd = pair
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


__all__ = [
    "METRIC_NAMES",
    "ReliabilityCurve",
    "binary_metrics",
    "bootstrap_auc_ci",
    "brier_score",
    "confusion",
    "expected_calibration_error",
    "format_mean_sd",
    "mean_sd",
    "reliability_curve",
    "summarise",
]
