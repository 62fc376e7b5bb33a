"""predict_batch: one forward pass for many studies gives what Predictor.predict gives one by one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_fusion.inference.card.model import default_card_path
from dicom_fusion.inference.data.images import PreparedImage, load_study_image
from dicom_fusion.inference.data.timeline_tensor import TimelineTensor, encode_timeline
from dicom_fusion.inference.serve.batch_predict import BatchOptions, predict_batch, prepare_model
from dicom_fusion.inference.serve.predict import Predictor
from dicom_fusion.inference.synth.generate import generate_cohort


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load(default_card_path(), device="cpu")


@pytest.fixture(scope="module")
def images(predictor: Predictor, tmp_path_factory: pytest.TempPathFactory) -> list[PreparedImage]:
    cohort = generate_cohort(3, tmp_path_factory.mktemp("cohort"), seed=5, progress=False)
    return [load_study_image(sorted(Path(p.study_dir).glob("*.dcm")), predictor.card) for p in cohort]


def _timeline(predictor: Predictor, values: tuple[float, ...]) -> TimelineTensor:
    from dataclasses import make_dataclass

    event = make_dataclass("Event", ["kind", "system", "code", "time", "value"], frozen=True)
    study = datetime(2025, 1, 1, tzinfo=UTC)
    events = [event("observation", "http://loinc.org", "4548-4", study - timedelta(days=d), v)
              for d, v in zip((300, 120, 10), values, strict=True)]
    tensor = encode_timeline(events, study, predictor.card.timeline)
    assert tensor is not None
    return tensor


def test_batch_equals_one_by_one(predictor: Predictor, images: list[PreparedImage]) -> None:
    timelines = [_timeline(predictor, (5.5, 6.4, 7.9)), None, _timeline(predictor, (5.0, 5.1, 5.2))]
    reasons = [None, "FHIR unavailable", None]
    batch = predict_batch(predictor, images, timelines, reasons)
    for img, tl, reason, got in zip(images, timelines, reasons, batch, strict=True):
        want = predictor.predict(img, tl, image_only_reason=reason)
        assert got.finding.name == want.finding.name
        assert got.image_only == want.image_only and got.image_only_reason == want.image_only_reason
        np.testing.assert_allclose([p.probability for p in got.probabilities],
                                   [p.probability for p in want.probabilities], rtol=1e-4, atol=1e-5)
        assert got.to_dict().keys() == want.to_dict().keys()


def test_channels_last_gives_the_same_probabilities(images: list[PreparedImage]) -> None:
    plain = Predictor.load(default_card_path(), device="cpu")
    nhwc = Predictor.load(default_card_path(), device="cpu")
    options = BatchOptions(channels_last=True)
    prepare_model(nhwc, options)
    a = predict_batch(plain, images, [None] * len(images))
    b = predict_batch(nhwc, images, [None] * len(images), options=options)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose([p.probability for p in x.probabilities],
                                   [p.probability for p in y.probabilities], rtol=1e-4, atol=1e-5)


def test_batch_checks_its_inputs(predictor: Predictor, images: list[PreparedImage]) -> None:
    assert predict_batch(predictor, [], []) == []
    with pytest.raises(ValueError, match="2 images but 1 timelines"):
        predict_batch(predictor, images[:2], [None])
    with pytest.raises(ValueError, match="image 1 of the batch has shape"):
        predict_batch(predictor, [images[0], np.zeros((1, 8, 8), np.float32)], [None, None])


def test_cpu_options_need_no_cuda() -> None:
    assert BatchOptions.for_device(torch.device("cpu")) == BatchOptions()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_batch_close_to_fp32(images: list[PreparedImage]) -> None:
    cpu = Predictor.load(default_card_path(), device="cpu")
    gpu = Predictor.load(default_card_path(), device="cuda")
    options = BatchOptions.for_device(gpu.device)
    prepare_model(gpu, options)
    a = predict_batch(cpu, images, [None] * len(images))
    b = predict_batch(gpu, images, [None] * len(images), options=options)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose([p.probability for p in x.probabilities],
                                   [p.probability for p in y.probabilities], atol=0.02)
