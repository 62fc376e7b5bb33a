"""Fold ensemble (issue 20 item 2): members written by training, loaded and averaged by the predictor, the
spread and the members-disagree rule, the same numbers in batch, and the shipping decision rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from timeline_events import SPEC, STUDY, condition, glucose

from dicom_fusion.fhir.events import events_from_bundle
from dicom_fusion.inference.card.model import (
    INDETERMINATE,
    LOINC,
    EnsembleSpec,
    ModelCard,
    TimelineFeature,
    TimelineSpec,
    load_card,
    write_card,
)
from dicom_fusion.inference.data.cohort import load_cohort
from dicom_fusion.inference.data.timeline_tensor import encode_timeline, rescale_timeline
from dicom_fusion.inference.errors import InferenceError, ModelCardError, WeightsMismatchError
from dicom_fusion.inference.report.ensemble import compare_ensemble, decide, write_comparison
from dicom_fusion.inference.serve.batch_predict import predict_batch
from dicom_fusion.inference.serve.predict import Predictor, calibrated_probabilities, choose_finding
from dicom_fusion.inference.synth.generate import generate_cohort
from dicom_fusion.inference.train.classifier import TrainConfig, TrainResult, train_model
from dicom_fusion.inference.train.crossval import encode_timelines

TINY = TrainConfig(folds=3, max_epochs=2, patience=1, batch_size=16, seed=3, ensemble=True,
                   indeterminate_half_width=0.05)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(30, out, seed=12, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(cohort_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return train_model(cohort_dir, tmp_path_factory.mktemp("model"), TINY, progress=False,
                       read_events=events_from_bundle)


@pytest.fixture(scope="module")
def ensemble_card(trained: TrainResult) -> ModelCard:
    return load_card(trained.card.path.parent / "ensemble" / "card.toml")


# --------------------------------------------------------------------------- timeline scaling per member


def test_rescaled_timeline_equals_encoding_with_the_members_scaler() -> None:
    other = dataclasses.replace(SPEC, features=(
        dataclasses.replace(SPEC.features[0], mean=93.0, std=12.5),
        dataclasses.replace(SPEC.features[1], mean=0.3, std=0.7),
    ))
    # glucose first measured in the middle bin (rows before it are imputed), a condition in the oldest bin
    events = [condition(80), glucose(40, 120.0), glucose(5, 85.0)]
    encoded = encode_timeline(events, STUDY, SPEC)
    assert encoded is not None and encoded.mask[0, 0] == 0  # imputed glucose in row 0
    rescaled = rescale_timeline(encoded, SPEC, other)
    direct = encode_timeline(events, STUDY, other)
    assert direct is not None
    np.testing.assert_allclose(rescaled.values, direct.values, atol=1e-5)
    np.testing.assert_array_equal(rescaled.mask, direct.mask)
    np.testing.assert_array_equal(rescaled.deltas, direct.deltas)
    assert rescaled.length == direct.length


def test_rescale_refuses_other_features() -> None:
    encoded = encode_timeline([glucose(5, 90.0)], STUDY, SPEC)
    assert encoded is not None
    other = TimelineSpec(resource_types=("Observation",), window_days=90, bin_days=30, features=(
        TimelineFeature("hba1c", "observation", LOINC, "4548-4", "%", mean=5.5, std=0.6),
        SPEC.features[1],
    ))
    with pytest.raises(ValueError, match="differ in window, bins or features"):
        rescale_timeline(encoded, SPEC, other)


# --------------------------------------------------------------------------- written by training


def test_training_writes_every_fold_as_a_member(trained: TrainResult, ensemble_card: ModelCard) -> None:
    folder = ensemble_card.path.parent
    assert ensemble_card.ensemble is not None
    assert ensemble_card.ensemble.members == ("fold2.toml", "fold3.toml")
    assert ensemble_card.weights == folder / "fold1.pt"
    assert ensemble_card.name == trained.card.name + "-ensemble"  # another model for UIDs and the ledger
    assert ensemble_card.calibration == trained.card.calibration  # the OOF calibrator, reused
    assert ensemble_card.threshold == trained.card.threshold
    members = [load_card(p) for p in ensemble_card.member_paths]
    scalers = {(f.timeline.features[0].mean, f.timeline.features[0].std) for f in (ensemble_card, *members)}
    assert len(scalers) == 3  # each member keeps the scaler of its own training folds
    for k, fold in enumerate(trained.cv.folds):
        assert fold.spec == (ensemble_card, *members)[k].timeline
    assert not (folder / "fold1.toml").exists()


def test_ensemble_card_rules(ensemble_card: ModelCard) -> None:
    with pytest.raises(ModelCardError, match="at least one member"):
        EnsembleSpec(members=())
    with pytest.raises(ModelCardError, match="relative to the card"):
        EnsembleSpec(members=("/abs/fold2.toml",))
    with pytest.raises(ModelCardError, match="max_spread must be in"):
        EnsembleSpec(members=("fold2.toml",), max_spread=0.7)
    text = ensemble_card.path.read_text()
    bad = ensemble_card.path.with_name("bad.toml")
    bad.write_text(text.replace('members = ["fold2.toml", "fold3.toml"]', 'members = ["fold2.toml", "fold2.toml"]'))
    with pytest.raises(ModelCardError, match="lists a card twice"):
        load_card(bad)


# --------------------------------------------------------------------------- predicting


@pytest.fixture(scope="module")
def cohort(cohort_dir: Path, ensemble_card: ModelCard):  # type: ignore[no-untyped-def]
    return load_cohort(cohort_dir, ensemble_card, read_events=events_from_bundle, progress=False)


def test_ensemble_averages_its_members_before_calibration(ensemble_card: ModelCard, cohort) -> None:  # type: ignore[no-untyped-def]
    ensemble = Predictor.load(ensemble_card.path, device="cpu")
    assert len(ensemble.members) == 3
    # each member alone, fed the timeline encoded with its own scaler (as it was trained)
    alone = [Predictor.load(ensemble_card.path, device="cpu")]
    alone[0].members = alone[0].members[:1]
    alone += [Predictor.load(p, device="cpu") for p in ensemble_card.member_paths]
    k = ensemble_card.positive_index
    checked = 0
    for i in range(len(cohort)):
        timeline = encode_timeline(cohort.events[i], cohort.study_times[i], ensemble_card.timeline)
        if timeline is None:
            continue
        result = ensemble.predict(cohort.images[i], timeline)
        raws = []
        for member in alone:
            own = encode_timeline(cohort.events[i], cohort.study_times[i], member.card.timeline)
            raws.append(member.raw_probabilities(member._image_tensor(cohort.images[i]), own)[0])
        mean = np.mean(raws, axis=0)
        expected = calibrated_probabilities(ensemble_card, mean.tolist(), image_only=False)
        assert result.probabilities[k].probability == pytest.approx(expected[k].probability, abs=1e-5)
        spread = np.std(ensemble_card.calibrated([r[k] for r in raws]))
        assert result.spread == pytest.approx(spread, abs=1e-5)
        assert "ensemble of 3 networks" in result.uncertainty
        checked += 1
    assert checked >= 10


def test_batch_gives_the_single_study_numbers(ensemble_card: ModelCard, cohort) -> None:  # type: ignore[no-untyped-def]
    ensemble = Predictor.load(ensemble_card.path, device="cpu")
    timelines = encode_timelines(cohort.events, cohort.study_times, ensemble_card.timeline)
    batch = predict_batch(ensemble, list(cohort.images), timelines)
    for image, timeline, got in zip(cohort.images, timelines, batch, strict=True):
        one = ensemble.predict(image, timeline)
        assert got.finding.name == one.finding.name
        assert got.spread == pytest.approx(one.spread, abs=1e-5)
        assert got.probabilities[1].probability == pytest.approx(one.probabilities[1].probability, abs=1e-5)


def test_members_that_disagree_make_the_finding_indeterminate(ensemble_card: ModelCard) -> None:
    card = dataclasses.replace(ensemble_card, calibration=None, threshold=0.5,
                               ensemble=EnsembleSpec(members=ensemble_card.ensemble.members, max_spread=0.1))  # type: ignore[union-attr]
    probs = calibrated_probabilities(card, [0.1, 0.9], image_only=False)
    finding, why = choose_finding(card, probs, spread=0.05)
    assert finding.name == card.positive_class and why == ""
    finding, why = choose_finding(card, probs, spread=0.2)
    assert finding.name == INDETERMINATE.name and finding.probability == pytest.approx(0.9)
    assert "members disagree" in why and "0.20" in why and "0.10" in why


def test_explanation_of_an_ensemble_is_the_members_mean(ensemble_card: ModelCard, cohort) -> None:  # type: ignore[no-untyped-def]
    ensemble = Predictor.load(ensemble_card.path, device="cpu")
    timeline = encode_timeline(cohort.events[0], cohort.study_times[0], ensemble_card.timeline)
    explanation = ensemble.explain(cohort.images[0], timeline)
    assert explanation.saliency.shape == tuple(ensemble_card.image.size)
    assert float(explanation.saliency.max()) == pytest.approx(1.0)
    if timeline is not None:
        assert [a.name for a in explanation.attributions] == [f.name for f in ensemble_card.timeline.features]


def test_a_member_with_other_weights_or_classes_is_refused(ensemble_card: ModelCard, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "ensemble"
    shutil.copytree(ensemble_card.path.parent, copy)
    (copy / "fold3.pt").write_bytes((copy / "fold2.pt").read_bytes())
    with pytest.raises(WeightsMismatchError, match="fold3.pt has sha256"):
        Predictor.load(copy / "card.toml", device="cpu")
    shutil.copy(ensemble_card.path.parent / "fold3.pt", copy / "fold3.pt")
    member = load_card(copy / "fold3.toml")
    classes = (member.classes[1], member.classes[0])
    write_card(dataclasses.replace(member, classes=classes), copy / "fold3.toml")
    with pytest.raises(InferenceError, match="differs from card .* in classes"):
        Predictor.load(copy / "card.toml", device="cpu")


# --------------------------------------------------------------------------- the decision


@pytest.mark.parametrize(
    ("delta_auc", "delta_ece", "ratio", "ship", "words"),
    [
        (0.012, 0.0, 1.5, True, "ROC-AUC +0.012"),
        (0.0, -0.015, 1.9, True, "ECE -0.015"),
        (0.02, -0.02, 2.5, False, "2.5x the time"),
        (0.004, -0.004, 1.2, False, "no gain"),
    ],
)
def test_shipping_rule(delta_auc: float, delta_ece: float, ratio: float, ship: bool, words: str) -> None:
    decided, why = decide(delta_auc, delta_ece, ratio)
    assert decided is ship and words in why


def test_comparison_measures_both_models_on_a_fresh_cohort(trained: TrainResult, ensemble_card: ModelCard,
                                                           tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    generate_cohort(24, fresh, seed=13, progress=False)
    data = load_cohort(fresh, ensemble_card, read_events=events_from_bundle, progress=False)
    result = compare_ensemble(Predictor.load(trained.card.path, device="cpu"),
                              Predictor.load(ensemble_card.path, device="cpu"), data, cohort_name="fresh",
                              timing_studies=4, explain_studies=3, progress=False)
    assert (result.single.networks, result.ensemble.networks) == (1, 3)
    assert result.patients == 24 and result.spread.chosen_on == 12
    assert result.delta_auc == pytest.approx(result.ensemble.roc_auc - result.single.roc_auc)
    assert result.ensemble.infer_ms > 0 and result.time_ratio > 0
    assert result.spread.max_spread > 0
    page = write_comparison(result, tmp_path / "report")
    assert "Decision: the ensemble is" in page.read_text()
    assert (tmp_path / "report" / "ensemble.json").is_file()
    with pytest.raises(ValueError, match="no \\[ensemble\\] table"):
        compare_ensemble(Predictor.load(trained.card.path, device="cpu"),
                         Predictor.load(trained.card.path, device="cpu"), data, cohort_name="x", progress=False)


def test_the_shipped_ensemble_is_complete_and_the_default_follows_its_measured_decision() -> None:
    import json

    from dicom_fusion.inference.card.model import default_card_path
    from dicom_fusion.service.config import Settings

    card = load_card(default_card_path().parent / "ensemble" / "card.toml")
    predictor = Predictor.load(card.path, device="cpu")  # every member's sha256 checked
    assert len(predictor.members) == 5 and card.ensemble is not None and card.ensemble.max_spread is not None
    assert card.drift is not None and card.calibration is not None
    report = Path(__file__).resolve().parents[2] / "docs" / "model-report"
    decided = json.loads((report / "ensemble.json").read_text())
    assert decided["spread"]["max_spread"] == card.ensemble.max_spread
    assert Settings().model.ensemble is decided["ship"]  # the default is what the comparison decided
