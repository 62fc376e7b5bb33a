"""The k fold models of one cross-validation, written as one ensemble card (issue "Model trust", item 2).

Why the fold models: they exist anyway (cross-validation trains them), each saw a different 80 % of the
cohort, and their out-of-fold predictions are exactly what the calibrator and the threshold were fitted
on (train/calibrate.py), so the ensemble card reuses that `[calibration]` unchanged. Whether the average
of the members beats the single final model is not assumed here: `dicom-fusion model compare`
(report/ensemble.py) measures it on patients none of the members saw.

Layout of `<out>/ensemble/`: `card.toml` (the ensemble; its own weights are member 1, `fold1.pt`), and
`fold<k>.toml` + `fold<k>.pt` for the other members, each a full card with the timeline scaling its fold
was trained with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dicom_fusion.inference.card.model import EnsembleSpec, ModelCard, write_card
from dicom_fusion.inference.train.calibrate import CVCalibration
from dicom_fusion.inference.train.checkpoint import save_state
from dicom_fusion.inference.train.crossval import CVResult

ENSEMBLE_SUFFIX = "-ensemble"
"""Appended to the model name: an ensemble is another model for the SR and report UIDs and the ledger."""


def member_card(cv: CVResult, calibration: CVCalibration, out_dir: Path, fold: int) -> ModelCard:
    """The card of fold `fold`'s model (1-based), before its weights are written."""
    result = cv.folds[fold - 1]
    return dataclasses.replace(
        cv.card,
        name=cv.card.name + ENSEMBLE_SUFFIX,
        timeline=result.spec,
        calibration=calibration.spec,
        threshold=calibration.threshold,
        weights=(out_dir / f"fold{fold}.pt").resolve(),
        path=(out_dir / f"fold{fold}.toml").resolve(),
    )


def write_ensemble(cv: CVResult, calibration: CVCalibration, out_dir: Path, metrics: dict[str, float],
                   *, max_spread: float | None = None) -> ModelCard:
    """Write every fold's best fusion model and the ensemble card naming them; returns the ensemble card.

    Members are written before the card that names them, so a reader never finds a card whose members
    are missing. Raises ValueError when the cross-validation kept no fusion model (it ran without "fusion").
    """
    if not cv.folds or any(f.fusion_state is None for f in cv.folds):
        raise ValueError("the cross-validation kept no fusion model per fold; run it with the fusion mode")
    out_dir = Path(out_dir)
    saved = [save_state(f.fusion_state, member_card(cv, calibration, out_dir, f.fold), metrics)  # type: ignore[arg-type]
             for f in cv.folds]
    first, others = saved[0], saved[1:]
    card = dataclasses.replace(
        first,
        path=(out_dir / "card.toml").resolve(),
        ensemble=EnsembleSpec(members=tuple(m.path.name for m in others), max_spread=max_spread),
    )
    write_card(card, card.path)
    (out_dir / "fold1.toml").unlink(missing_ok=True)  # member 1 is the ensemble card itself
    return card


__all__ = ["ENSEMBLE_SUFFIX", "member_card", "write_ensemble"]
