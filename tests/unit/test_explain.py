"""Explanations: Grad-CAM map of the image's shape, IG per timeline feature, Predictor.explain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_fusion.inference.card.model import ModelCard
from dicom_fusion.inference.data.cohort import EhrEvent
from dicom_fusion.inference.data.timeline_tensor import TimelineTensor, encode_timeline
from dicom_fusion.inference.nets.hybrid import build_model, collate_timelines, init_model
from dicom_fusion.inference.serve.explain import explain, integrated_gradients, save_overlay
from dicom_fusion.inference.serve.predict import Predictor

STUDY = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def card(tmp_path_factory: pytest.TempPathFactory) -> ModelCard:
    return init_model(tmp_path_factory.mktemp("model"), seed=3)


@pytest.fixture(scope="module")
def timeline(card: ModelCard) -> TimelineTensor:
    events = [
        EhrEvent("observation", "http://loinc.org", "2345-7", STUDY - timedelta(days=d), v, "mg/dL")
        for d, v in ((400, 95.0), (200, 130.0), (20, 160.0))
    ]
    events += [EhrEvent("condition", "http://snomed.info/sct", "44054006", STUDY - timedelta(days=90), None)]
    tensor = encode_timeline(events, STUDY, card.timeline)
    assert tensor is not None
    return tensor


def _image(card: ModelCard) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.random((card.image.channels, *card.image.size), dtype=np.float32) * 0.2
    image[:, 40:60, 70:90] = 1.0
    return image


def test_explain_shapes_and_features(card: ModelCard, timeline: TimelineTensor) -> None:
    torch.manual_seed(0)
    model = build_model(card)
    exp = explain(model, card, _image(card), timeline)
    assert exp.saliency.shape == card.image.size and exp.saliency.dtype == np.float32
    assert np.isfinite(exp.saliency).all() and 0.0 <= exp.saliency.min() and exp.saliency.max() <= 1.0
    assert [a.name for a in exp.attributions] == [f.name for f in card.timeline.features]
    assert 0.0 <= exp.probability <= 1.0
    top = exp.top_features(2)
    assert len(top) == 2 and abs(top[0].attribution) >= abs(top[1].attribution)
    image_only = explain(model, card, _image(card), None)
    assert image_only.attributions == () and image_only.saliency.shape == card.image.size
    with pytest.raises(ValueError, match="expects"):
        explain(model, card, np.zeros((1, 64, 64), np.float32), timeline)


def test_integrated_gradients_are_complete(card: ModelCard, timeline: TimelineTensor) -> None:
    """Attributions sum to p(patient) - p(every value at the training mean), up to the step error."""
    torch.manual_seed(1)
    model = build_model(card).eval()
    image = _image(card)
    attributions = integrated_gradients(model, card, image, timeline, steps=64)
    assert attributions.shape == timeline.values.shape
    assert not attributions[timeline.length :].any()  # padding rows get nothing

    def prob(values: np.ndarray) -> float:
        tl = collate_timelines(
            [TimelineTensor(values, timeline.mask, timeline.deltas, timeline.length)], card.timeline
        )
        with torch.no_grad():
            logits = model(
                torch.from_numpy(image)[None], tl.values, tl.mask, tl.deltas, tl.lengths, tl.has_timeline
            )
        return float(torch.softmax(logits, 1)[0, card.positive_index])

    gap = prob(timeline.values) - prob(np.zeros_like(timeline.values))
    assert attributions.sum() == pytest.approx(gap, abs=max(1e-4, 0.02 * abs(gap)))


def test_predictor_explain_and_overlay(card: ModelCard, timeline: TimelineTensor, tmp_path: Path) -> None:
    predictor = Predictor.load(card.path, device="cpu")
    exp = predictor.explain(_image(card), timeline)
    assert exp.saliency.shape == card.image.size and len(exp.attributions) == len(card.timeline.features)
    assert exp.probability == pytest.approx(
        predictor.predict(_image(card), timeline).probabilities[card.positive_index].probability, abs=1e-6
    )
    png = save_overlay(_image(card), exp.saliency, tmp_path / "o.png", title="t", mark=(0.4, 0.6, 0.1))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
