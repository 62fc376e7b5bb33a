"""Single network or fold ensemble: the measured decision (issue "Model trust", item 2).

Both models are run on a cohort none of their networks saw (a fresh synthetic seed: nested evaluation,
since the ensemble's members were each validated on a different fold of the training cohort and no
out-of-fold prediction of the whole ensemble exists there). Reported per model: ROC-AUC and ECE of the
calibrated probabilities with bootstrap 95 % intervals, Brier score, and the time per study of
`Predictor.predict` alone and of predict + explain (what the infer stage runs with `model.explain`);
for the difference, a paired bootstrap (the same resampled patients for both models).

The ensemble ships as the default only if it gains >= 0.01 ROC-AUC or lowers the ECE by >= 0.01 at
<= 2x the infer stage's time per study (`decide`). The members' spread limit (`max_spread`, the card's
"members disagree" rule) is chosen on the first half of the cohort (a quantile of the spread) and its
effect (share of studies flagged, error rate of flagged vs. the others) reported on the second half.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.progress import track

from dicom_fusion.inference.data.cohort import Cohort
from dicom_fusion.inference.data.timeline_tensor import TimelineTensor
from dicom_fusion.inference.serve.batch_predict import predict_batch
from dicom_fusion.inference.serve.predict import InferenceResult, Predictor
from dicom_fusion.inference.train.crossval import encode_timelines
from dicom_fusion.inference.train.scores import bootstrap_auc_ci, brier_score, expected_calibration_error

AUC_GAIN = 0.01
ECE_GAIN = 0.01
MAX_TIME_RATIO = 2.0


@dataclass(frozen=True)
class ModelFigures:
    """One model on the comparison cohort."""

    name: str
    networks: int
    roc_auc: float
    roc_auc_ci: tuple[float, float]
    ece: float
    ece_ci: tuple[float, float]
    brier: float
    predict_ms: float
    """Median time of `Predictor.predict` per study (lesion channel included), milliseconds."""
    infer_ms: float
    """Median time of predict + explain per study (the infer stage with explanations), milliseconds."""


@dataclass(frozen=True)
class SpreadRule:
    """The members-disagree rule: limit chosen on the first half, its effect on the second half."""

    quantile: float
    max_spread: float
    chosen_on: int
    evaluated_on: int
    flagged_share: float
    error_flagged: float
    error_others: float
    spread_median: float


@dataclass(frozen=True)
class EnsembleComparison:
    cohort: str
    patients: int
    positives: int
    single: ModelFigures
    ensemble: ModelFigures
    delta_auc: float
    delta_auc_ci: tuple[float, float]
    delta_ece: float
    delta_ece_ci: tuple[float, float]
    time_ratio: float
    """Ensemble / single, infer stage (predict + explain) per study."""
    predict_ratio: float
    spread: SpreadRule
    ship: bool
    decision: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def positive_probabilities(results: Sequence[InferenceResult], positive_index: int) -> np.ndarray:
    """The calibrated probability of the positive class of each result."""
    return np.array([r.probabilities[positive_index].probability for r in results])


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else math.nan


def paired_bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float],
                     *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of metric(y, b) - metric(y, a) over patients resampled with replacement
    (the same resample for both models); resamples with one class only are skipped."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        pick = rng.integers(0, y.size, y.size)
        if len(np.unique(y[pick])) < 2:
            continue
        diffs.append(metric(y[pick], b[pick]) - metric(y[pick], a[pick]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def _ece_ci(y: np.ndarray, p: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    values = [expected_calibration_error(y[pick], p[pick])
              for pick in (rng.integers(0, y.size, y.size) for _ in range(n_boot))]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def time_per_study(predictor: Predictor, images: np.ndarray, timelines: Sequence[TimelineTensor | None],
                   *, explain: bool) -> float:
    """Median milliseconds of one study's predict (+ explain) over the given studies, one at a time as
    the worker runs them (the first call, which warms the caches, is not counted)."""
    times = []
    for i, (image, timeline) in enumerate(zip(images, timelines, strict=True)):
        started = time.perf_counter()
        predictor.predict(image, timeline)
        if explain:
            predictor.explain(image, timeline)
        if i:
            times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def decide(delta_auc: float, delta_ece: float, time_ratio: float) -> tuple[bool, str]:
    """The shipping rule of the issue: a gain of >= 0.01 ROC-AUC or >= 0.01 ECE at <= 2x the time."""
    gains = []
    if delta_auc >= AUC_GAIN:
        gains.append(f"ROC-AUC +{delta_auc:.3f}")
    if -delta_ece >= ECE_GAIN:
        gains.append(f"ECE {delta_ece:+.3f}")
    if not gains:
        return False, (f"not the default: no gain of {AUC_GAIN} ROC-AUC or {ECE_GAIN} ECE (ROC-AUC "
                       f"{delta_auc:+.3f}, ECE {delta_ece:+.3f})"
                       + (f", and {time_ratio:.1f}x the time per study" if time_ratio > MAX_TIME_RATIO else ""))
    if time_ratio > MAX_TIME_RATIO:
        return False, (f"not the default: {', '.join(gains)}, but {time_ratio:.1f}x the time per study "
                       f"(more than {MAX_TIME_RATIO:g}x)")
    return True, f"the default: {', '.join(gains)} at {time_ratio:.1f}x the time per study"


def compare_ensemble(single: Predictor, ensemble: Predictor, cohort: Cohort, *, cohort_name: str,
                     spread_quantile: float = 0.95, timing_studies: int = 30, explain_studies: int = 10,
                     progress: bool = True) -> EnsembleComparison:
    """Run both predictors on every patient of `cohort` and measure them (module docstring)."""
    if ensemble.card.ensemble is None:
        raise ValueError(f"card {ensemble.card.path} has no [ensemble] table; pass the ensemble card")
    if len(cohort) < 20:
        raise ValueError(f"the comparison cohort has {len(cohort)} patients; use at least 20 (a few hundred "
                         "for intervals narrower than the 0.01 being decided)")
    y = np.asarray(cohort.labels)
    k = single.card.positive_index
    chunks = range(0, len(cohort), 32)
    results: dict[str, list[InferenceResult]] = {"single": [], "ensemble": []}
    for start in (track(chunks, description="single and ensemble") if progress else chunks):
        stop = min(start + 32, len(cohort))
        images = cohort.images[start:stop]
        for name, predictor in (("single", single), ("ensemble", ensemble)):
            timelines = encode_timelines(cohort.events[start:stop], cohort.study_times[start:stop],
                                         predictor.card.timeline)
            results[name] += predict_batch(predictor, list(images), timelines)
    p_single = positive_probabilities(results["single"], k)
    p_ens = positive_probabilities(results["ensemble"], k)

    def figures(name: str, predictor: Predictor, p: np.ndarray) -> ModelFigures:
        timelines = encode_timelines(cohort.events, cohort.study_times, predictor.card.timeline)
        n, m = min(timing_studies, len(cohort)), min(explain_studies, len(cohort))
        return ModelFigures(
            name=f"{predictor.card.name} {predictor.card.version}",
            networks=len(predictor.members),
            roc_auc=_auc(y, p), roc_auc_ci=bootstrap_auc_ci(y, p),
            ece=expected_calibration_error(y, p), ece_ci=_ece_ci(y, p),
            brier=brier_score(y, p),
            predict_ms=time_per_study(predictor, cohort.images[:n], timelines[:n], explain=False),
            infer_ms=time_per_study(predictor, cohort.images[:m], timelines[:m], explain=True),
        )

    one, many = figures("single", single, p_single), figures("ensemble", ensemble, p_ens)
    delta_auc, delta_ece = many.roc_auc - one.roc_auc, many.ece - one.ece
    time_ratio, predict_ratio = many.infer_ms / one.infer_ms, many.predict_ms / one.predict_ms
    ship, decision = decide(delta_auc, delta_ece, time_ratio)
    return EnsembleComparison(
        cohort=cohort_name, patients=len(cohort), positives=int(y.sum()),
        single=one, ensemble=many,
        delta_auc=delta_auc, delta_auc_ci=paired_bootstrap(y, p_single, p_ens, _auc),
        delta_ece=delta_ece, delta_ece_ci=paired_bootstrap(y, p_single, p_ens, expected_calibration_error),
        time_ratio=time_ratio, predict_ratio=predict_ratio,
        spread=spread_rule(results["ensemble"], y, ensemble, spread_quantile),
        ship=ship, decision=decision,
    )


def spread_rule(results: Sequence[InferenceResult], y: np.ndarray, ensemble: Predictor,
                quantile: float) -> SpreadRule:
    """Choose `max_spread` as the `quantile` of the spread on the first half of the results; on the second
    half, the share of studies it flags and the error rate (at the card's threshold) of flagged vs others."""
    spread = np.array([r.spread if r.spread is not None else 0.0 for r in results])
    p = positive_probabilities(results, ensemble.card.positive_index)
    half = len(results) // 2
    limit = float(np.quantile(spread[:half], quantile))
    flagged = spread[half:] > limit
    wrong = (p[half:] >= ensemble.card.threshold).astype(int) != y[half:]
    return SpreadRule(
        quantile=quantile, max_spread=round(limit, 4), chosen_on=half, evaluated_on=len(results) - half,
        flagged_share=float(flagged.mean()),
        error_flagged=float(wrong[flagged].mean()) if flagged.any() else math.nan,
        error_others=float(wrong[~flagged].mean()) if (~flagged).any() else math.nan,
        spread_median=float(np.median(spread)),
    )


def _ci(pair: tuple[float, float]) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def comparison_markdown(c: EnsembleComparison) -> str:
    """The decision as the evaluation report's page (docs/model-report/ensemble.md)."""
    rows = [
        f"| {f.name} | {f.networks} | {f.roc_auc:.3f} {_ci(f.roc_auc_ci)} | {f.ece:.3f} {_ci(f.ece_ci)} | "
        f"{f.brier:.3f} | {f.predict_ms:.0f} | {f.infer_ms:.0f} |"
        for f in (c.single, c.ensemble)
    ]
    s = c.spread
    return "\n".join([
        "# Single network or fold ensemble",
        "",
        (f"Nested evaluation on `{c.cohort}`: {c.patients} synthetic patients ({c.positives} malignant) of a seed "
         "no network of either model saw. Probabilities are calibrated (each card's `[calibration]`, fitted on "
         "the training cohort's out-of-fold predictions). Time: median per study, one study at a time on this "
         "machine's CPU; *predict* is `Predictor.predict` (lesion channel included), *infer* adds the "
         "Grad-CAM + integrated-gradients explanation the infer stage makes by default."),
        "",
        "| model | networks | ROC-AUC [95 % CI] | ECE [95 % CI] | Brier | predict ms | infer ms |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        (f"Ensemble − single (paired bootstrap, 95 %): ROC-AUC {c.delta_auc:+.3f} {_ci(c.delta_auc_ci)}, "
         f"ECE {c.delta_ece:+.3f} {_ci(c.delta_ece_ci)}; time per study {c.predict_ratio:.1f}x (predict), "
         f"{c.time_ratio:.1f}x (infer)."),
        "",
        (f"**Decision: the ensemble is {c.decision}.** Rule (issue 20): the default only with >= {AUC_GAIN} "
         f"ROC-AUC or >= {ECE_GAIN} ECE gained at <= {MAX_TIME_RATIO:g}x the infer time per study."),
        "",
        "## Members disagree",
        "",
        (f"`[ensemble] max_spread` = {s.max_spread:.4f}: the {s.quantile:.0%} quantile of the members' spread "
         f"(standard deviation of their calibrated probabilities) on the first {s.chosen_on} patients (median "
         f"spread {s.spread_median:.3f}). On the other {s.evaluated_on}: {s.flagged_share:.1%} flagged "
         f"indeterminate by it; error rate at the card's threshold {s.error_flagged:.1%} among the flagged vs "
         f"{s.error_others:.1%} among the others."),
        "",
    ])


def write_comparison(c: EnsembleComparison, out: Path) -> Path:
    """ensemble.md and ensemble.json in `out`; returns the markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "ensemble.json").write_text(json.dumps(c.to_dict(), indent=1) + "\n", encoding="utf-8")
    page = out / "ensemble.md"
    page.write_text(comparison_markdown(c), encoding="utf-8")
    return page


__all__ = [
    "EnsembleComparison",
    "ModelFigures",
    "SpreadRule",
    "compare_ensemble",
    "comparison_markdown",
    "decide",
    "paired_bootstrap",
    "positive_probabilities",
    "spread_rule",
    "time_per_study",
    "write_comparison",
]
