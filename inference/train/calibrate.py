"""Calibration of the cross-validated model: fit, choose by cross-validated ECE, pick the threshold.

Why: the class-weighted loss buys recall at 0.5 with over-confident mid-range probabilities (fusion ECE
0.10 before this module), and a clinician reads the probability, not only the class. The fix is fitted
after training, on the out-of-fold (OOF) predictions of the cross-validation: every patient's score from
a model that never saw them, the only honest material for a post-hoc map.

Choosing the method (`select_calibration`) reuses the CV folds as the split of the OOF set: each fold's
predictions are calibrated by a calibrator fitted on the other folds' OOF predictions ("cross-fitted"),
so every number below is measured on patients the calibrator did not see. The method with the lowest
pooled cross-fitted ECE wins, among those that keep the mean per-fold ROC-AUC within `AUC_TOLERANCE` of
the raw one (isotonic steps tie scores); identity always qualifies. The winner is then refitted on every
OOF prediction: that is the calibrator the card stores. The threshold (`choose_threshold`) is the
highest calibrated probability that still finds `target_sensitivity` of the positives in the OOF set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score

from dicom_fusion.inference.card.model import CALIBRATION_METHODS, CalibrationSpec, Calibrator
from dicom_fusion.inference.train.config import TrainConfig
from dicom_fusion.inference.train.crossval import NO_EHR, CVResult
from dicom_fusion.inference.train.scores import brier_score, expected_calibration_error

AUC_TOLERANCE = 0.005
"""A calibrator may cost at most this much pooled ROC-AUC (only isotonic can: its flat steps tie scores)."""
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.asarray(np.log(q) - np.log1p(-q))


def _nll(z: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy of logits `z` (log-sum-exp form: no overflow)."""
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_calibrator(method: str, y_true: np.ndarray, prob: np.ndarray) -> Calibrator:
    """Fit calibration `method` to 0/1 truth and raw positive-class probabilities.

    temperature and platt minimise the log loss (the proper score they are defined by); isotonic is
    sklearn's pool-adjacent-violators fit, stored as its knots. A set with one class only, or with a
    single distinct score, carries no information about calibration: the result is identity.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    if method == "identity" or len(np.unique(y)) < 2 or len(np.unique(p)) < 2:
        return Calibrator()
    z = _logit(p)
    if method == "temperature":
        found = minimize_scalar(lambda log_t: _nll(z / math.exp(log_t), y), bounds=(-4.0, 4.0), method="bounded")
        return Calibrator(method="temperature", temperature=round(math.exp(float(found.x)), 6))
    if method == "platt":
        found = minimize(lambda ab: _nll(ab[0] * z + ab[1], y), x0=np.array([1.0, 0.0]), method="L-BFGS-B",
                         bounds=[(1e-3, 100.0), (-20.0, 20.0)])
        slope, intercept = (float(v) for v in found.x)
        return Calibrator(method="platt", slope=round(slope, 6), intercept=round(intercept, 6))
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(p, y)
    x_knots, y_knots = np.asarray(iso.X_thresholds_, dtype=float), np.asarray(iso.y_thresholds_, dtype=float)
    if x_knots.size < 2:
        return Calibrator()
    return Calibrator(method="isotonic", x=tuple(float(v) for v in x_knots),
                      y=tuple(float(v) for v in np.maximum.accumulate(y_knots)))


def cross_fitted(method: str, y_true: np.ndarray, prob: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Calibrated probabilities where each group (CV fold) is mapped by a calibrator fitted on the others."""
    y, p, g = np.asarray(y_true), np.asarray(prob, dtype=np.float64), np.asarray(groups)
    out = np.empty_like(p)
    for group in np.unique(g):
        held = g == group
        out[held] = fit_calibrator(method, y[~held], p[~held]).apply(p[held])
    return out


@dataclass(frozen=True)
class MethodScore:
    """One calibration method's cross-fitted figures on the pooled OOF predictions."""

    method: str
    ece: float
    brier: float
    roc_auc: float


@dataclass(frozen=True)
class CalibrationChoice:
    """The chosen calibrator (refitted on every OOF prediction), why, and the before/after figures."""

    calibrator: Calibrator
    scores: tuple[MethodScore, ...]
    raw: MethodScore  # the uncalibrated predictions (identity is also among `scores`)
    cross_fitted: np.ndarray  # [N] OOF probabilities calibrated by the chosen method, fold-wise

    @property
    def chosen(self) -> MethodScore:
        return next(s for s in self.scores if s.method == self.calibrator.method)


def _score(method: str, y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> MethodScore:
    """ECE and Brier pooled; ROC-AUC as the mean over groups (folds), because each fold's predictions come
    from another model and another calibrator: pooling would mix their scales into the ranking, while
    within a fold only the method itself (isotonic ties) can change it."""
    g = np.asarray(groups)
    aucs = [float(roc_auc_score(y[g == k], p[g == k])) for k in np.unique(g) if len(np.unique(y[g == k])) == 2]
    auc = float(np.mean(aucs)) if aucs else math.nan
    return MethodScore(method, expected_calibration_error(y, p), brier_score(y, p), auc)


def select_calibration(
    y_true: np.ndarray, prob: np.ndarray, groups: np.ndarray, methods: Sequence[str] = CALIBRATION_METHODS
) -> CalibrationChoice:
    """Cross-fit every method over `groups` (the CV folds), keep the lowest pooled ECE among the methods
    whose mean per-fold ROC-AUC stays within AUC_TOLERANCE of the raw one, and refit it on all predictions."""
    y, p = np.asarray(y_true), np.asarray(prob, dtype=np.float64)
    raw = _score("identity", y, p, groups)
    fitted = {m: cross_fitted(m, y, p, groups) for m in dict.fromkeys(("identity", *methods))}
    scores = tuple(_score(m, y, q, groups) for m, q in fitted.items())
    candidates = [s for s in scores if s.method in methods]
    eligible = [s for s in candidates
                if s.method == "identity" or math.isnan(raw.roc_auc) or s.roc_auc >= raw.roc_auc - AUC_TOLERANCE]
    best = min(eligible or candidates,  # one method asked for: it, whatever its AUC
               key=lambda s: (s.ece, CALIBRATION_METHODS.index(s.method)))  # ties: the simpler
    return CalibrationChoice(fit_calibrator(best.method, y, p), scores, raw, fitted[best.method])


def choose_threshold(y_true: np.ndarray, calibrated: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold t (4 decimals, rounded down) with sensitivity P(p >= t | positive) >=
    `target_sensitivity` on these predictions: as specific as the sensitivity target allows."""
    if not 0 < target_sensitivity < 1:
        raise ValueError(f"target_sensitivity must be in (0, 1), got {target_sensitivity}")
    y, p = np.asarray(y_true), np.asarray(calibrated, dtype=np.float64)
    positives = np.sort(p[y == 1])[::-1]
    if positives.size == 0:
        raise ValueError("no positive case among the predictions: a sensitivity target cannot set a threshold")
    needed = math.ceil(target_sensitivity * positives.size - 1e-9)  # positives that must score >= t
    return math.floor(float(positives[needed - 1]) * 10_000) / 10_000


def indeterminate_band(threshold: float, half_width: float) -> tuple[float, float] | None:
    """[threshold - half_width, threshold + half_width] within [0, 1]; None when half_width is 0."""
    if half_width <= 0:
        return None
    return round(max(0.0, threshold - half_width), 4), round(min(1.0, threshold + half_width), 4)


def sensitivity_specificity(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of predicting positive when prob >= threshold."""
    y, pred = np.asarray(y_true), np.asarray(prob) >= threshold
    sens = float(pred[y == 1].mean()) if (y == 1).any() else math.nan
    spec = float((~pred[y == 0]).mean()) if (y == 0).any() else math.nan
    return sens, spec


# --------------------------------------------------------------------------- a cross-validation run

CALIBRATED = "+calibrated"
"""Suffix of a variant whose held-out probabilities were calibrated cross-fitted (see the module doc)."""
CALIBRATED_VARIANTS = ("fusion", NO_EHR, "image", "timeline")
"""The network variants the report calibrates; the card stores the fusion and no-EHR calibrators."""


@dataclass(frozen=True)
class CVCalibration:
    """What calibration made of one cross-validation run: per variant the choice, the card's table."""

    choices: dict[str, CalibrationChoice]
    spec: CalibrationSpec
    threshold: float
    sensitivity: float  # pooled OOF, fusion, calibrated by the final calibrator, at `threshold`
    specificity: float
    band_share: float | None  # share of OOF patients whose calibrated fusion probability is in the band


def calibrate_cv(cv: CVResult, config: TrainConfig) -> CVCalibration:
    """Calibrate every network variant of `cv` on its OOF predictions, store the cross-fitted
    probabilities as `<variant>+calibrated` in the folds, choose the threshold and the band.

    Idempotent: a second call returns the first result (`train` calibrates, `--report` reuses it).
    """
    if cv.calibration is not None:
        return cv.calibration  # type: ignore[no-any-return]
    methods = CALIBRATION_METHODS if config.calibration == "auto" else (config.calibration,)
    groups = np.concatenate([np.full(f.test_idx.size, f.fold) for f in cv.folds])
    choices: dict[str, CalibrationChoice] = {}
    for variant in (v for v in CALIBRATED_VARIANTS if v in cv.variants):
        y, p = cv.pooled(variant)
        choices[variant] = choice = select_calibration(y, p, groups, methods)
        start = 0
        for fold in cv.folds:
            fold.probs[variant + CALIBRATED] = choice.cross_fitted[start:start + fold.test_idx.size]
            start += fold.test_idx.size
    y, p = cv.pooled("fusion")
    final = choices["fusion"].calibrator
    calibrated = final.apply(p)
    threshold = (choose_threshold(y, calibrated, config.target_sensitivity)
                 if config.target_sensitivity is not None else cv.card.threshold)
    band = indeterminate_band(threshold, config.indeterminate_half_width)
    no_ehr = choices[NO_EHR].calibrator if NO_EHR in choices else None
    spec = CalibrationSpec(
        **{k: getattr(final, k) for k in ("method", "temperature", "slope", "intercept", "x", "y")},
        no_ehr=no_ehr, target_sensitivity=config.target_sensitivity, indeterminate=band,
    )
    for variant in choices:
        cv.thresholds[variant + CALIBRATED] = threshold
    sensitivity, specificity = sensitivity_specificity(y, calibrated, threshold)
    share = float(np.mean((calibrated >= band[0]) & (calibrated <= band[1]))) if band else None
    cv.calibration = CVCalibration(choices, spec, threshold, sensitivity, specificity, share)
    return cv.calibration


__all__ = [
    "AUC_TOLERANCE",
    "CALIBRATED",
    "CALIBRATED_VARIANTS",
    "CVCalibration",
    "calibrate_cv",
    "CalibrationChoice",
    "MethodScore",
    "choose_threshold",
    "cross_fitted",
    "fit_calibrator",
    "indeterminate_band",
    "select_calibration",
    "sensitivity_specificity",
]
