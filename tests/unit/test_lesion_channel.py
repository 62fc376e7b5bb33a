"""Segmentation-guided classification: the lesion channel in training and serving inputs, its checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_fusion.inference.card.model import (
    ImageSpec,
    ModelCard,
    default_card,
    default_card_path,
    load_card,
    sha256_file,
    write_card,
)
from dicom_fusion.inference.card.segmenter import default_segmenter_path
from dicom_fusion.inference.data.images import load_study_image
from dicom_fusion.inference.nets.hybrid import build_model
from dicom_fusion.inference.serve.batch_predict import predict_batch
from dicom_fusion.inference.serve.lesion_channel import GuideMismatchError, load_guide, with_lesion_channel
from dicom_fusion.inference.serve.predict import Predictor
from dicom_fusion.inference.serve.segment import Segmenter, resize_mask
from dicom_fusion.inference.synth.generate import generate_cohort


def _guided_card(out: Path, *, size: tuple[int, int] = (128, 128)) -> ModelCard:
    """An untrained segmentation-guided model (weights + card) next to the shipped segmenter."""
    provisional = default_card(weights=out / "weights.pt", sha256="0" * 64, path=out / "card.toml")
    image = dataclasses.replace(provisional.image, size=size, lesion_channel=True)
    card = dataclasses.replace(provisional, image=image, segmenter=default_segmenter_path())
    torch.manual_seed(0)
    torch.save(build_model(card).state_dict(), card.weights)
    card = dataclasses.replace(card, sha256=sha256_file(card.weights))
    write_card(card, card.path)
    return load_card(card.path)


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory) -> list:  # type: ignore[type-arg]
    return generate_cohort(3, tmp_path_factory.mktemp("cohort"), seed=4, progress=False)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.load(_guided_card(tmp_path_factory.mktemp("guided")).path, device="cpu")


def test_lesion_channel_is_the_segmenters_probability_and_finds_the_lesion(patients: list) -> None:  # type: ignore[type-arg]
    guide = Segmenter.load(default_segmenter_path())
    card = load_card(default_card_path())  # its image spec is the one the segmenter reads
    images = np.stack([load_study_image(sorted(p.study_dir.glob("*.dcm")), card).array for p in patients])
    x = with_lesion_channel(images, guide)
    assert x.shape == (3, 2, 128, 128) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, :1], images)
    np.testing.assert_allclose(x[:, 1], guide.probability(images), atol=1e-6)
    assert 0.0 <= x[:, 1].min() and x[:, 1].max() <= 1.0
    # the channel marks the planted lesion: high inside its mask, near zero elsewhere
    for p, channel in zip(patients, x[:, 1], strict=True):
        mask = np.load(p.mask_path)
        small = resize_mask(mask, card.image.size) > 0
        assert channel[small].mean() > 0.3 and channel[~small].mean() < 0.01  # small lesions score lower
    assert with_lesion_channel(images, None).shape == images.shape  # no guide: unchanged


def test_guided_predictor_serves_prepared_images(predictor: Predictor, patients: list) -> None:  # type: ignore[type-arg]
    assert predictor.guide is not None and predictor.card.image.network_channels == 2
    image = load_study_image(sorted(patients[0].study_dir.glob("*.dcm")), predictor.card)
    assert image.array.shape == (1, 128, 128)  # the service prepares one channel; the predictor adds one
    single = predictor.predict(image, None)
    batch = predict_batch(predictor, [image, image.array], [None, None])
    for r in batch:
        np.testing.assert_allclose(
            [c.probability for c in r.probabilities], [c.probability for c in single.probabilities], atol=1e-5
        )
    explanation = predictor.explain(image, None)
    assert explanation.saliency.shape == (128, 128)
    with pytest.raises(ValueError, match="expects"):
        predictor.predict(np.zeros((2, 128, 128), np.float32), None)  # already guided: refused


def test_guide_must_read_the_classifiers_input(tmp_path: Path) -> None:
    card = _guided_card(tmp_path, size=(64, 64))
    with pytest.raises(GuideMismatchError, match="same input"):
        Predictor.load(card.path, device="cpu")
    with pytest.raises(GuideMismatchError, match=r"prepares \(2, \(64, 64\), 1, None\)"):
        load_guide(card)
    plain = dataclasses.replace(card, image=ImageSpec(2, (64, 64), 1, None, "smallcnn"))
    assert load_guide(plain) is None
