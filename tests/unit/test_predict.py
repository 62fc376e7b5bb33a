"""Predictor: load checks, determinism, image-only flag, finding rule, result serialisation."""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from dicom_fusion.inference.card.model import ImageSpec, default_card_path, load_card, write_card
from dicom_fusion.inference.data.images import PreparedImage, load_study_image
from dicom_fusion.inference.data.timeline_tensor import TimelineTensor, encode_timeline
from dicom_fusion.inference.errors import InferenceError, WeightsMismatchError
from dicom_fusion.inference.serve.predict import (
    ClassProbability,
    InferenceResult,
    Predictor,
    choose_finding,
    resolve_device,
)
from dicom_fusion.inference.synth.generate import generate_cohort


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load(default_card_path(), device="cpu")


@pytest.fixture(scope="module")
def image(predictor: Predictor, tmp_path_factory: pytest.TempPathFactory) -> PreparedImage:
    (patient,) = generate_cohort(1, tmp_path_factory.mktemp("cohort"), seed=2, progress=False)
    return load_study_image(sorted(patient.study_dir.glob("*.dcm")), predictor.card)


@pytest.fixture(scope="module")
def timeline(predictor: Predictor) -> TimelineTensor:
    from dataclasses import make_dataclass

    event = make_dataclass("Event", ["kind", "system", "code", "time", "value"], frozen=True)
    study = datetime(2025, 1, 1, tzinfo=UTC)
    events = [
        event("observation", "http://loinc.org", "4548-4", study - timedelta(days=d), v)
        for d, v in ((300, 5.5), (120, 6.4), (10, 7.9))
    ]
    tensor = encode_timeline(events, study, predictor.card.timeline)
    assert tensor is not None
    return tensor


def test_predict_is_deterministic(
    predictor: Predictor, image: PreparedImage, timeline: TimelineTensor
) -> None:
    first = predictor.predict(image, timeline)
    again = Predictor.load(default_card_path(), device="auto").predict(image, timeline)
    assert first == again
    assert first.model_name == "dfusion-hybrid-demo" and first.model_version == "0.1.0"
    assert sum(p.probability for p in first.probabilities) == pytest.approx(1.0, abs=1e-6)
    assert [p.code for p in first.probabilities] == ["3898006", "363346000"]
    assert not first.image_only and first.image_only_reason is None


def test_predict_image_only(predictor: Predictor, image: PreparedImage, timeline: TimelineTensor) -> None:
    result = predictor.predict(image, None)
    assert result.image_only and result.image_only_reason == "no_timeline"
    assert predictor.predict(image, None, image_only_reason="unavailable").image_only_reason == "unavailable"
    assert predictor.predict(image, timeline, image_only_reason="ignored").image_only_reason is None
    assert result != predictor.predict(image, timeline)  # the timeline branch contributes


def test_predict_accepts_plain_array(predictor: Predictor, image: PreparedImage) -> None:
    assert predictor.predict(image.array, None) == predictor.predict(image, None)


def test_predict_rejects_wrong_shapes(predictor: Predictor, timeline: TimelineTensor) -> None:
    with pytest.raises(ValueError, match=r"expects \(1, 128, 128\)"):
        predictor.predict(np.zeros((1, 64, 64), np.float32), None)
    short = dataclasses.replace(timeline, values=timeline.values[:5], mask=timeline.mask[:5])
    with pytest.raises(ValueError, match="encode_timeline"):
        predictor.predict(np.zeros((1, 128, 128), np.float32), short)


def test_predict_result_round_trips_through_json(predictor: Predictor, image: PreparedImage) -> None:
    result = predictor.predict(image, None, image_only_reason="no_patient")
    assert InferenceResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def _probs(benign: float) -> tuple[ClassProbability, ...]:
    return (
        ClassProbability("benign", "3898006", "http://snomed.info/sct", "Neoplasm, benign", benign),
        ClassProbability(
            "malignant", "363346000", "http://snomed.info/sct", "Malignant neoplastic disease", 1 - benign
        ),
    )


@pytest.mark.parametrize(
    ("threshold", "benign", "finding"),
    [
        (0.5, 0.4, "malignant"),
        (0.5, 0.5, "malignant"),
        (0.5, 0.6, "benign"),
        (0.2, 0.7, "malignant"),
        (0.9, 0.3, "benign"),
    ],
)
def test_predict_finding_uses_threshold(
    predictor: Predictor, threshold: float, benign: float, finding: str
) -> None:
    card = dataclasses.replace(predictor.card, threshold=threshold, calibration=None)  # no indeterminate band
    assert choose_finding(card, _probs(benign))[0].name == finding


def _copy_default(tmp_path: Path) -> Path:
    card = load_card(default_card_path())
    shutil.copy(card.weights, tmp_path / "weights.pt")
    write_card(dataclasses.replace(card, weights=tmp_path / "weights.pt"), tmp_path / "card.toml")
    return tmp_path / "card.toml"


def test_predict_load_refuses_tampered_weights(tmp_path: Path) -> None:
    card_path = _copy_default(tmp_path)
    with open(tmp_path / "weights.pt", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(WeightsMismatchError, match="sha256"):
        Predictor.load(card_path)


def test_predict_load_refuses_weights_of_another_network(tmp_path: Path) -> None:
    card_path = _copy_default(tmp_path)
    card = load_card(card_path)
    rgb = ImageSpec(spatial_dims=2, size=(128, 128), channels=3, window=None, encoder="smallcnn")
    write_card(dataclasses.replace(card, image=rgb), card_path)
    with pytest.raises(WeightsMismatchError, match=r"does not fit the network.*3 input channel"):
        Predictor.load(card_path)


def test_predict_device_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(InferenceError, match="CUDA is not available"):
        resolve_device("cuda")
