"""Training: tiny end-to-end run, no leakage across folds, reproducibility, config, evaluation report."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_fusion.fhir.events import events_from_bundle
from dicom_fusion.inference.card.model import DEFAULT_TIMELINE, ImageSpec, load_card, sha256_file
from dicom_fusion.inference.card.segmenter import default_segmenter_path
from dicom_fusion.inference.data.cohort import Cohort, EhrEvent, load_cohort, read_bundle_events
from dicom_fusion.inference.nets.hybrid import HybridNet, collate_timelines
from dicom_fusion.inference.report.evaluate import evaluate_cv, lesion_mass
from dicom_fusion.inference.serve.predict import Predictor
from dicom_fusion.inference.synth.generate import generate_cohort
from dicom_fusion.inference.train.classifier import (
    TrainConfig,
    TrainResult,
    base_card,
    cross_validate,
    fit_data,
    fit_timeline_scaler,
    load_train_config,
    make_folds,
    new_model,
    train_model,
)
from dicom_fusion.inference.train.fitloop import FitData, FitSettings, fit, predict_positive
from dicom_fusion.inference.train.scores import binary_metrics

TINY = TrainConfig(folds=2, max_epochs=2, patience=1, batch_size=16, seed=5)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(24, out, seed=11, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(cohort_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    out = tmp_path_factory.mktemp("model")
    return train_model(
        cohort_dir,
        out,
        TINY,
        modes=("fusion", "image", "timeline"),
        progress=False,
        read_events=events_from_bundle,
    )


def test_train_writes_loadable_card_and_checkpoint(trained: TrainResult, cohort_dir: Path) -> None:
    card = load_card(trained.card.path)
    assert card == trained.card and sha256_file(card.weights) == card.sha256
    assert (card.path.parent / "training.json").is_file()
    for key in ("cv_roc_auc_mean", "cv_roc_auc_sd", "cv_no_ehr_roc_auc_mean", "cv_ece_mean", "n_patients"):
        assert key in card.metrics
    assert card.metrics["n_patients"] == 24 and card.metrics["cv_folds"] == 2
    # the card's feature scaling is the one fitted on all patients (the final model's training set)
    cohort = trained.cohort
    assert card.timeline == fit_timeline_scaler(cohort.events, cohort.study_times, DEFAULT_TIMELINE)
    predictor = Predictor.load(card.path, device="cpu")
    result = predictor.predict(cohort.images[0], None)
    assert result.image_only and result.model_version == TINY.version


def test_train_folds_do_not_leak(trained: TrainResult) -> None:
    cohort, cv = trained.cohort, trained.cv
    tested = np.concatenate([f.test_idx for f in cv.folds])
    assert sorted(tested.tolist()) == list(range(len(cohort)))  # every patient held out exactly once
    for fold in cv.folds:
        assert not set(fold.train_idx) & set(fold.test_idx)
        train_only = fit_timeline_scaler(
            [cohort.events[i] for i in fold.train_idx],
            [cohort.study_times[i] for i in fold.train_idx],
            DEFAULT_TIMELINE,
        )
        assert fold.spec == train_only
        assert fold.spec != fit_timeline_scaler(cohort.events, cohort.study_times, DEFAULT_TIMELINE)
        assert {"fusion", "fusion_no_ehr", "image", "timeline"} <= set(fold.probs)
        assert all(len(p) == len(fold.test_idx) for p in fold.probs.values())


def test_scaler_ignores_held_out_patients() -> None:
    """A wild value in a held-out patient must not move the scaler fitted for that fold."""
    study = datetime(2025, 1, 1, tzinfo=UTC)

    def glucose(v: float) -> tuple[EhrEvent, ...]:
        return (
            EhrEvent("observation", "http://loinc.org", "2345-7", study - timedelta(days=30), v, "mg/dL"),
        )

    labels = np.array([0, 1] * 6)
    events = [glucose(100.0 + i) for i in range(12)]
    train, test = make_folds(labels, 3, seed=0)[0]
    wild = [glucose(1e6) if i in set(test) else e for i, e in enumerate(events)]
    fit = [
        fit_timeline_scaler([ev[i] for i in train], [study] * len(train), DEFAULT_TIMELINE)
        for ev in (events, wild)
    ]
    assert fit[0] == fit[1]
    g = fit[0].features[0]
    assert g.mean == pytest.approx(np.mean([100.0 + i for i in train]))


def test_same_seed_same_predictions(trained: TrainResult) -> None:
    again = cross_validate(trained.cohort, trained.cv.card, TINY, ("fusion",), progress=False)
    for a, b in zip(trained.cv.folds, again.folds, strict=True):
        np.testing.assert_array_equal(a.test_idx, b.test_idx)
        np.testing.assert_allclose(a.probs["fusion"], b.probs["fusion"], rtol=0, atol=1e-6)
    other = cross_validate(
        trained.cohort, trained.cv.card, dataclasses.replace(TINY, seed=6), ("fusion",), progress=False
    )
    assert not np.allclose(np.concatenate(other.pooled("fusion")), np.concatenate(again.pooled("fusion")))


def test_evaluate_writes_report_and_figures(trained: TrainResult, cohort_dir: Path, tmp_path: Path) -> None:
    result = evaluate_cv(trained.cohort, trained.cv, tmp_path, cohort_dir=cohort_dir)
    text = result.report.read_text()
    for needle in (
        "Fusion CNN+LSTM",
        "Image-only CNN",
        "Timeline-only LSTM",
        "Logistic regression",
        "Gradient boosting",
        "ROC-AUC",
        "ECE",
        "Grad-CAM",
    ):
        assert needle in text
    for png in (
        "roc.png",
        "confusion.png",
        "calibration.png",
        "learning_curves.png",
        "timeline_attributions.png",
    ):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG", png
        assert f"]({png})" in text
    assert list(tmp_path.glob("gradcam_*.png")) and (tmp_path / "report.html").is_file()
    assert set(result.summary) >= {"fusion", "image", "timeline", "logistic_regression", "gradient_boosting"}
    assert result.explanations.lesion_mass is not None  # synthetic cohorts record the planted lesion


def test_lesion_mass_counts_saliency_in_the_disc() -> None:
    saliency = np.zeros((100, 100))
    saliency[45:56, 45:56] = 1.0
    share, area, peak = lesion_mass(saliency, (0.5, 0.5, 0.1))
    assert share == pytest.approx(1.0) and peak and 0.05 < area < 0.08
    share, _, peak = lesion_mass(saliency, (0.1, 0.1, 0.05))
    assert share == 0.0 and not peak


def test_fit_learns_an_easy_task() -> None:
    """Loss falls and held-out AUC > 0.8 when a bright square marks the positives."""
    spec = ImageSpec(spatial_dims=2, size=(32, 32), channels=1, window=None, encoder="smallcnn")
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 40)
    images = rng.random((80, 1, 32, 32), dtype=np.float32) * 0.3
    images[labels == 1, :, 8:20, 8:20] += 0.7
    torch.manual_seed(0)
    model = HybridNet(spec, len(DEFAULT_TIMELINE.features), 2)
    data = FitData(
        torch.from_numpy(images), collate_timelines([None] * 80, DEFAULT_TIMELINE), torch.from_numpy(labels)
    )
    settings = FitSettings(
        batch_size=16,
        learning_rate=3e-3,
        weight_decay=0.0,
        max_epochs=8,
        patience=8,
        modality_dropout=0.0,
        augment=False,
    )
    result = fit(model, data, np.arange(60), np.arange(60, 80), "image", settings, seed=0)
    assert result.history[-1].train_loss < result.history[0].train_loss
    auc = binary_metrics(labels[60:], predict_positive(model, data, np.arange(60, 80), "image", 1))["roc_auc"]
    assert auc > 0.8


def test_train_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text('folds = 3\nmax_epochs = 7\nencoder = "smallcnn"\nversion = "2.0.0"\n')
    config = load_train_config(path, seed=9, folds=None)
    assert (config.folds, config.max_epochs, config.seed, config.version) == (3, 7, 9, "2.0.0")
    path.write_text("learning_rte = 0.1\n")
    with pytest.raises(ValueError, match="unknown key.*learning_rte"):
        load_train_config(path)
    with pytest.raises(ValueError, match="encoder must be one of"):
        load_train_config(None, encoder="resnet")
    with pytest.raises(ValueError, match="at least 2 patients of each label"):
        make_folds(np.array([0, 0, 0, 1]), 2, seed=0)


def test_bundle_reader_matches_synth(cohort_dir: Path) -> None:
    events = read_bundle_events(cohort_dir / "SYN00001" / "bundle.json", DEFAULT_TIMELINE,
                                read_events=events_from_bundle)
    kinds = {e.kind for e in events}
    assert {"observation", "encounter"} <= kinds and all(e.time.tzinfo is not None for e in events)
    assert all(e.value is not None for e in events if e.kind == "observation")
    assert read_bundle_events(cohort_dir / "missing.json", DEFAULT_TIMELINE, read_events=events_from_bundle) == ()


def test_cohort_images_are_cached(cohort_dir: Path, trained: TrainResult) -> None:
    card = base_card(TINY, cohort_dir / "m")
    assert list((cohort_dir / ".cache").glob("images-*.npy"))
    again: Cohort = load_cohort(cohort_dir, card, read_events=events_from_bundle, progress=False)
    np.testing.assert_array_equal(again.images, trained.cohort.images)


def test_cli_train_and_evaluate_report_bad_input(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dicom_fusion.service.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["train", "--cohort", str(tmp_path / "nope"), "--out", str(tmp_path / "m")])
    assert missing.exit_code == 1 and "cohort.csv" in missing.output
    bad = tmp_path / "train.toml"
    bad.write_text("epochs = 3\n")
    typo = runner.invoke(app, ["evaluate", "--cohort", str(tmp_path), "--out", str(tmp_path), "-c", str(bad)])
    assert typo.exit_code == 2 and "unknown key" in typo.output


def test_encoder_weights_transfer_and_freeze(trained: TrainResult, tmp_path: Path) -> None:
    card = trained.card
    config = dataclasses.replace(TINY, encoder_weights=card.weights, freeze_encoder=True)
    model = new_model(card, config)
    shipped = torch.load(card.weights, weights_only=True)
    for name, tensor in model.image_encoder.state_dict().items():
        assert torch.equal(tensor, shipped[f"image_encoder.{name}"]), name
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    data = fit_data(trained.cohort, card, card.timeline)
    fit(model, data, np.arange(12), None, "fusion", config.fit_settings, seed=0, epochs=1)
    assert all(torch.equal(v, before[k]) for k, v in model.image_encoder.state_dict().items())
    bad = tmp_path / "bad.pt"
    torch.save({"nonsense": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="do not fit encoder"):
        new_model(card, dataclasses.replace(TINY, encoder_weights=bad))


def test_segmentation_guided_training_end_to_end(cohort_dir: Path, tmp_path: Path) -> None:
    """lesion_channel: the card records it and its segmenter, the predictor adds the channel itself, the
    report carries the '+ lesion area' baselines next to the plain ones."""
    config = dataclasses.replace(TINY, folds=2, max_epochs=1, lesion_channel=True)
    result = train_model(cohort_dir, tmp_path / "model", config, progress=False, read_events=events_from_bundle)
    card = load_card(result.card.path)
    assert card.image.lesion_channel and card.image.network_channels == 2
    assert card.segmenter == default_segmenter_path().resolve()
    assert 'segmenter = "' in card.path.read_text()
    predictor = Predictor.load(card.path, device="cpu")
    assert predictor.guide is not None
    assert predictor.model.image_encoder.features[0].conv.in_channels == 2
    assert 0.0 <= predictor.predict(result.cohort.images[0], None).finding.probability <= 1.0
    report = evaluate_cv(result.cohort, result.cv, tmp_path / "report", cohort_dir=cohort_dir)
    assert {"gradient_boosting+lesion_area", "logistic_regression+lesion_area"} <= set(report.summary)
    text = report.report.read_text()
    assert "Gradient boosting (tabular + segmenter lesion area)" in text and "Segmentation-guided" in text


def test_lesion_channel_config_needs_a_matching_segmenter(tmp_path: Path) -> None:
    config = dataclasses.replace(TINY, lesion_channel=True, segmenter=tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="missing.toml"):
        base_card(config, tmp_path / "model")
