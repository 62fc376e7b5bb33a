"""Calibration (train/calibrate.py, card/model.py Calibrator): fitting, selection, threshold, band, the
card's `[calibration]` table, the predictor applying it, and `dicom-fusion model card`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from dicom_fusion.inference.card.document import card_document
from dicom_fusion.inference.card.model import (
    INDETERMINATE,
    CalibrationSpec,
    Calibrator,
    ModelCard,
    default_card_path,
    load_card,
    write_card,
)
from dicom_fusion.inference.errors import ModelCardError
from dicom_fusion.inference.serve.predict import Predictor, calibrated_probabilities, choose_finding
from dicom_fusion.inference.train.calibrate import (
    choose_threshold,
    cross_fitted,
    fit_calibrator,
    indeterminate_band,
    select_calibration,
)
from dicom_fusion.inference.train.scores import bootstrap_auc_ci, brier_score, expected_calibration_error


def _calibrated_set(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes drawn with exactly the stated probability: a perfectly calibrated set."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, n)
    return (rng.random(n) < p).astype(int), p


def _over_confident(n: int = 4000, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """True probability sigmoid(z), reported sigmoid(3 z): far too sure of itself at both ends."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return y, 1 / (1 + np.exp(-3 * z))


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_calibrator_does_not_spoil_a_calibrated_set(method: str) -> None:
    """Fitted on one half of a perfectly calibrated set, no method may do worse than identity on the other
    half by more than sampling noise (temperature and Platt should stay near T = 1, slope 1)."""
    y, p = _calibrated_set()
    fit_half, test_half = slice(0, 2000), slice(2000, None)
    calibrator = fit_calibrator(method, y[fit_half], p[fit_half])
    before = expected_calibration_error(y[test_half], p[test_half])
    after = expected_calibration_error(y[test_half], calibrator.apply(p[test_half]))
    # isotonic's steps fitted on 2000 points cost a little ECE on new data (hence selection by cross-fitted ECE)
    assert after <= before + (0.025 if method == "isotonic" else 0.015), (method, before, after)
    if method == "temperature":
        assert calibrator.temperature == pytest.approx(1.0, abs=0.1)
    if method == "platt":
        assert calibrator.slope == pytest.approx(1.0, abs=0.12) and abs(calibrator.intercept or 0) < 0.1


def test_temperature_softens_an_over_confident_model() -> None:
    y, p = _over_confident()
    calibrator = fit_calibrator("temperature", y, p)
    assert calibrator.temperature == pytest.approx(3.0, rel=0.15)  # the over-confidence factor we planted
    before, after = expected_calibration_error(y, p), expected_calibration_error(y, calibrator.apply(p))
    assert after < before / 3, (before, after)
    assert brier_score(y, calibrator.apply(p)) < brier_score(y, p)
    # a monotone map: the ranking, hence ROC-AUC, is unchanged
    order = np.argsort(p)
    assert np.all(np.diff(calibrator.apply(p)[order]) >= 0)


def test_isotonic_is_monotone_and_stays_in_unit_interval() -> None:
    y, p = _over_confident(n=1500, seed=3)
    calibrator = fit_calibrator("isotonic", y, p)
    grid = np.linspace(0, 1, 1001)
    mapped = calibrator.apply(grid)
    assert calibrator.method == "isotonic" and len(calibrator.x or ()) >= 2
    assert np.all(np.diff(mapped) >= 0) and mapped.min() >= 0 and mapped.max() <= 1
    assert expected_calibration_error(y, calibrator.apply(p)) < expected_calibration_error(y, p)


def test_degenerate_sets_give_identity() -> None:
    assert fit_calibrator("temperature", np.ones(10, int), np.linspace(0.1, 0.9, 10)).method == "identity"
    assert fit_calibrator("isotonic", np.array([0, 1, 0, 1]), np.full(4, 0.5)).method == "identity"
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibrator("beta", np.array([0, 1]), np.array([0.2, 0.8]))


def test_selection_by_cross_fitted_ece_prefers_a_real_fix() -> None:
    y, p = _over_confident(n=3000, seed=4)
    groups = np.arange(y.size) % 5
    choice = select_calibration(y, p, groups)
    assert choice.calibrator.method != "identity"
    assert choice.chosen.ece < choice.raw.ece / 2
    assert {s.method for s in choice.scores} == {"identity", "temperature", "platt", "isotonic"}
    # the cross-fitted probabilities of a group never come from a calibrator that saw it
    held = groups == 0
    expected = fit_calibrator(choice.calibrator.method, y[~held], p[~held]).apply(p[held])
    assert np.allclose(cross_fitted(choice.calibrator.method, y, p, groups)[held], expected)
    # a calibrated set: nothing to gain, the chosen method changes the ECE by noise only
    y2, p2 = _calibrated_set(n=3000, seed=6)
    calm = select_calibration(y2, p2, np.arange(y2.size) % 5)
    assert calm.chosen.ece <= calm.raw.ece + 1e-12


def test_threshold_meets_the_sensitivity_target() -> None:
    y, p = _over_confident(n=2000, seed=7)
    for target in (0.7, 0.85, 0.95):
        t = choose_threshold(y, p, target)
        sensitivity = float((p[y == 1] >= t).mean())
        assert sensitivity >= target
        # as specific as allowed: a threshold a little higher loses the target
        assert float((p[y == 1] >= t + 1e-3).mean()) < target or t >= p[y == 1].max() - 1e-3
    assert indeterminate_band(0.3, 0.1) == (0.2, 0.4)
    assert indeterminate_band(0.05, 0.1) == (0.0, 0.15)
    assert indeterminate_band(0.3, 0.0) is None


def test_bootstrap_ci_brackets_the_auc() -> None:
    from sklearn.metrics import roc_auc_score

    y, p = _over_confident(n=600, seed=8)
    low, high = bootstrap_auc_ci(y, p, seed=0)
    assert low < roc_auc_score(y, p) < high and 0.01 < high - low < 0.2
    assert bootstrap_auc_ci(y, p, seed=0) == (low, high)


# --------------------------------------------------------------------------- the card


def _calibrated_card(tmp_path: Path, **changes: object) -> ModelCard:
    shipped = load_card(default_card_path())
    spec = CalibrationSpec(method="temperature", temperature=2.0,
                           no_ehr=Calibrator(method="platt", slope=0.5, intercept=-0.2),
                           target_sensitivity=0.85, indeterminate=(0.35, 0.6))
    card = dataclasses.replace(shipped, calibration=spec, threshold=0.45, path=tmp_path / "card.toml", **changes)
    write_card(card, card.path)
    return card


def test_card_round_trip_with_calibration(tmp_path: Path) -> None:
    card = _calibrated_card(tmp_path)
    text = card.path.read_text()
    assert "[calibration]" in text and "[calibration.no_ehr]" in text and "intended_use" in text
    again = load_card(card.path)
    assert again == card and again.calibration is not None
    assert again.calibrated(0.9) == pytest.approx(1 / (1 + (0.1 / 0.9) ** 0.5))  # sigmoid(logit / 2)
    assert again.calibrated(0.9, image_only=True) != again.calibrated(0.9)
    # a card without the table is the identity (cards written before calibration)
    plain = dataclasses.replace(card, calibration=None)
    assert plain.calibrated(0.73) == pytest.approx(0.73) and not plain.is_indeterminate(0.5)


@pytest.mark.parametrize(("table", "message"), [
    ('method = "temperature"', "needs temperature"),
    ('method = "platt"\nslope = 1.0\nintercept = 0.0\ntemperature = 2.0', "takes no temperature"),
    ('method = "isotonic"\nx = [0.0, 0.5, 0.4]\ny = [0.0, 0.2, 0.3]', "strictly increasing"),
    ('method = "temperature"\ntemperature = -1.0', "must be > 0"),
    ('method = "identity"\nindeterminate = [0.6, 0.4]', "low < high"),
    ('method = "identity"\nindeterminate = [0.6, 0.7]', "must contain the threshold"),
    ('method = "sigmoid"', "unknown"),
])
def test_card_calibration_errors_name_the_key(tmp_path: Path, table: str, message: str) -> None:
    card = _calibrated_card(tmp_path)
    text = card.path.read_text()
    head = text[: text.index("[calibration]")]
    tail = text[text.index("[calibration.no_ehr]"):]
    tail = tail[tail.index("\n[", 1):] if "\n[" in tail[1:] else ""
    card.path.write_text(head + "[calibration]\n" + table + "\n" + tail)
    with pytest.raises(ModelCardError, match=message):
        load_card(card.path)


def test_finding_is_indeterminate_inside_the_band(tmp_path: Path) -> None:
    card = _calibrated_card(tmp_path)
    inside = calibrated_probabilities(card, [0.5, 0.5], image_only=False)  # T = 2 keeps 0.5 at 0.5
    finding, why = choose_finding(card, inside)
    assert finding.name == INDETERMINATE.name and finding.code == "82334004"
    assert "indeterminate band" in why
    assert finding.probability == pytest.approx(0.5)
    outside = calibrated_probabilities(card, [0.02, 0.98], image_only=False)
    assert choose_finding(card, outside) == (outside[card.positive_index], "")
    assert sum(p.probability for p in outside) == pytest.approx(1.0)
    below = calibrated_probabilities(card, [0.98, 0.02], image_only=False)
    assert choose_finding(card, below)[0].name != card.positive_class != INDETERMINATE.name


def test_predictor_applies_the_card_calibration(tmp_path: Path) -> None:
    shipped = Predictor.load(default_card_path(), device="cpu")
    card = _calibrated_card(tmp_path, weights=shipped.card.weights)
    calibrated = Predictor.load(card.path, device="cpu")
    rng = np.random.default_rng(0)
    image = rng.random((card.image.channels, *card.image.size)).astype(np.float32)
    raw = Predictor(dataclasses.replace(card, calibration=None), calibrated.model, calibrated.device).predict(image, None)
    got = calibrated.predict(image, None)
    k = card.positive_index
    expected = float(card.calibrated(raw.probabilities[k].probability, image_only=True))  # no timeline: no_ehr path
    assert got.probabilities[k].probability == pytest.approx(expected, abs=1e-6)
    assert got.calibration.startswith("Platt scaling") and raw.calibration == ""
    from dicom_fusion.inference.serve.batch_predict import predict_batch

    batch = predict_batch(calibrated, [image], [None])[0]
    assert batch.probabilities[k].probability == pytest.approx(expected, abs=1e-5)
    assert batch.calibration == got.calibration and batch.finding.name == got.finding.name


def test_model_card_document(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dicom_fusion.service.cli import app

    card = _calibrated_card(tmp_path, metrics={"n_patients": 1000.0, "prevalence": 0.32, "seed": 0.0,
                                                "cv_folds": 5.0, "cv_roc_auc_mean": 0.918, "cv_roc_auc_sd": 0.016,
                                                "oof_roc_auc_ci_low": 0.9, "oof_roc_auc_ci_high": 0.93,
                                                "oof_ece_before": 0.1, "oof_ece_after": 0.025,
                                                "oof_sensitivity": 0.85, "oof_specificity": 0.8})
    text = card_document(card)
    for needle in ("# Model card: dfusion-hybrid-demo", "## Intended use", "synthetic data only",
                   "not for clinical use", "1000 patients", "prevalence of malignant 32.0%", "0.918 ± 0.016",
                   "95 % CI 0.900–0.930", "temperature scaling (T = 2.000)", "ECE with EHR 0.100 → 0.025",
                   "sensitivity ≥ 85%", "[0.35, 0.6]", "82334004", "## Limitations"):
        assert needle in text, needle
    result = CliRunner().invoke(app, ["model", "card", str(card.path)])
    assert result.exit_code == 0 and "## Calibration" in result.output and "0.45 on the calibrated" in result.output
    shipped = CliRunner().invoke(app, ["model", "card"])
    assert shipped.exit_code == 0 and "# Model card: " in shipped.output
    missing = CliRunner().invoke(app, ["model", "card", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
