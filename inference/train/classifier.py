"""Training: stratified k-fold cross-validation by patient, then a final model on every patient.

Recipe (docs/architecture.md, "Method"): Adam, class-weighted cross-entropy, early stopping on the loss of an inner
validation split, MONAI augmentation on training images only, modality dropout for the fusion model
(fitloop.py); folds, per-fold scaler and no-leakage rules in crossval.py; settings in config.py.
Images are normalised per image (percentiles, `transforms.prepare_array`), so there is nothing to fit
for them.

The final model is fitted on all patients for the median early-stopping epoch of the folds, its
scaler on all patients; the card is written after the weights with the cross-validated metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicom_fusion.inference.card.model import ModelCard
from dicom_fusion.inference.data.cohort import BundleEventReader, Cohort, load_cohort
from dicom_fusion.inference.nets.hybrid import HybridNet
from dicom_fusion.inference.train.calibrate import CALIBRATED, CVCalibration, calibrate_cv
from dicom_fusion.inference.train.checkpoint import save_state
from dicom_fusion.inference.train.config import TrainConfig, base_card, load_train_config
from dicom_fusion.inference.train.crossval import (
    NO_EHR,
    CVResult,
    FoldResult,
    cross_validate,
    derive_seed,
    deterministic,
    encode_timelines,
    fit_data,
    fit_timeline_scaler,
    inner_split,
    make_folds,
    new_model,
    progress_bar,
)
from dicom_fusion.inference.train.ensemble import write_ensemble
from dicom_fusion.inference.train.fitloop import EpochStats, fit
from dicom_fusion.inference.train.scores import bootstrap_auc_ci, summarise


def card_metrics(cv: CVResult, final_epochs: int) -> dict[str, float]:
    """`cv_<metric>_mean` / `_sd` of the fusion model (and its no-EHR path), uncalibrated at 0.5 and
    (`cv_calibrated_*`) calibrated at the card's threshold, the pooled before/after calibration figures
    (`oof_*`, with the bootstrap 95 % interval of the ROC-AUC) and cohort facts."""
    out: dict[str, float] = {}
    pairs = [("fusion", "cv"), (NO_EHR, "cv_no_ehr"),
             ("fusion" + CALIBRATED, "cv_calibrated"), (NO_EHR + CALIBRATED, "cv_no_ehr_calibrated")]
    for variant, prefix in pairs:
        if variant in cv.variants:
            for name, (mean, sd) in summarise(cv.fold_metrics(variant)).items():
                if math.isfinite(mean):
                    out[f"{prefix}_{name}_mean"], out[f"{prefix}_{name}_sd"] = round(mean, 4), round(sd, 4)
    calibration = cv.calibration
    if isinstance(calibration, CVCalibration):
        y, p = cv.pooled("fusion")
        low, high = bootstrap_auc_ci(y, p, seed=cv.config.seed)
        for variant, prefix in (("fusion", "oof"), (NO_EHR, "oof_no_ehr")):
            if variant in calibration.choices:
                choice = calibration.choices[variant]
                out.update({
                    f"{prefix}_ece_before": round(choice.raw.ece, 4),
                    f"{prefix}_ece_after": round(choice.chosen.ece, 4),
                    f"{prefix}_brier_before": round(choice.raw.brier, 4),
                    f"{prefix}_brier_after": round(choice.chosen.brier, 4),
                    f"{prefix}_roc_auc": round(choice.raw.roc_auc, 4),
                })
        out.update(oof_roc_auc_ci_low=round(low, 4), oof_roc_auc_ci_high=round(high, 4),
                   oof_sensitivity=round(calibration.sensitivity, 4),
                   oof_specificity=round(calibration.specificity, 4))
        if calibration.band_share is not None:
            out["oof_indeterminate_share"] = round(calibration.band_share, 4)
    out.update(
        cv_folds=float(cv.config.folds),
        n_patients=float(cv.labels.size),
        prevalence=round(float(cv.labels.mean()), 4),
        final_epochs=float(final_epochs),
        seed=float(cv.config.seed),
    )
    return out


# --------------------------------------------------------------------------- final model


def save_model(model: HybridNet, card: ModelCard, metrics: dict[str, float]) -> ModelCard:
    """Write the weights (temp file, fsync, rename), then the card naming their sha256: never a card
    that points at missing or other weights."""
    return save_state(model.state_dict(), card, metrics)


@dataclass(eq=False)
class TrainResult:
    card: ModelCard
    cv: CVResult
    cohort: Cohort
    final_history: tuple[EpochStats, ...]
    seconds: float


def train_model(
    cohort_dir: Path,
    out_dir: Path,
    config: TrainConfig,
    *,
    read_events: BundleEventReader,
    modes: Sequence[str] = ("fusion",),
    progress: bool = True,
) -> TrainResult:
    """Cross-validate, train the final fusion model on every patient, write weights + card + training.json.

    ``read_events`` reads a patient's FHIR bundle into timeline events: the caller passes the serving
    reader (``dicom_fusion.fhir.events.events_from_bundle``), so the model learns from the events the
    timeline stage will give it.
    """
    started = time.monotonic()
    card = base_card(config, out_dir)
    cohort = load_cohort(cohort_dir, card, read_events=read_events, progress=progress)
    modes = ("fusion", *[m for m in modes if m != "fusion"])
    cv = cross_validate(cohort, card, config, modes, progress=progress)
    calibration = calibrate_cv(cv, config)
    epochs = max(1, int(np.median([f.best_epochs["fusion"] for f in cv.folds])))
    spec = fit_timeline_scaler(cohort.events, cohort.study_times, card.timeline)
    final_card = dataclasses.replace(card, timeline=spec, calibration=calibration.spec,
                                     threshold=calibration.threshold)
    data = fit_data(cohort, final_card, spec, cv.images)
    seed = derive_seed(config.seed, 0)
    with progress_bar(progress) as bar, deterministic(seed):
        task = bar.add_task("final model (all patients)", total=epochs, status="")
        model = new_model(final_card, config)
        outcome = fit(
            model,
            data,
            np.arange(len(cohort)),
            None,
            "fusion",
            config.fit_settings,
            seed=seed,
            epochs=epochs,
            on_epoch=lambda s: bar.update(task, advance=1, status=f"train {s.train_loss:.3f}"),
        )
    saved = save_model(model, final_card, card_metrics(cv, epochs))
    if config.ensemble:
        write_ensemble(cv, calibration, out_dir / "ensemble", saved.metrics)
    seconds = time.monotonic() - started
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()},
        "cohort": str(cohort_dir),
        "seconds": round(seconds, 1),
        "cv_seconds": round(cv.seconds, 1),
        "folds": [
            {
                "fold": f.fold,
                "best_epochs": f.best_epochs,
                "metrics": {v: f.metrics(cv.labels, v, cv.thresholds.get(v, card.threshold))
                            for v in cv.variants},
            }
            for f in cv.folds
        ],
        "final_history": [dataclasses.asdict(s) for s in outcome.history],
        "calibration": {
            variant: {"chosen": choice.calibrator.method, "cross_fitted": [dataclasses.asdict(m) for m in choice.scores]}
            for variant, choice in calibration.choices.items()
        },
        "threshold": calibration.threshold,
    }
    (saved.path.parent / "training.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return TrainResult(saved, cv, cohort, outcome.history, seconds)


__all__ = [
    "NO_EHR",
    "CVResult",
    "FoldResult",
    "TrainConfig",
    "TrainResult",
    "base_card",
    "card_metrics",
    "cross_validate",
    "derive_seed",
    "encode_timelines",
    "fit_data",
    "fit_timeline_scaler",
    "inner_split",
    "load_train_config",
    "make_folds",
    "new_model",
    "save_model",
    "save_state",
    "train_model",
]
