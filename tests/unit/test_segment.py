"""Lesion segmentation model side: geometry between source grid and network input, post-processing,
metrics on known shapes, the segmentation card, and a tiny training run that learns."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_fusion.inference.card.model import default_card, load_card, sha256_file, write_card
from dicom_fusion.inference.card.segmenter import (
    SegInput,
    SegmenterCard,
    load_segmenter_card,
    write_segmenter_card,
)
from dicom_fusion.inference.errors import ModelCardError
from dicom_fusion.inference.nets.segnet import build_segnet
from dicom_fusion.inference.serve.segment import (
    Segmenter,
    mask_coverage,
    postprocess,
    resize_mask,
    to_source_grid,
)
from dicom_fusion.inference.train.seg_scores import case_metrics
from dicom_fusion.inference.train.segmenter import SegCohort, SegFitSettings, fit_segnet, predict_cases


def disc(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) <= radius**2).astype(np.uint8)


def test_resize_mask_is_nearest_and_binary() -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 1
    small = resize_mask(mask, (4, 4))
    assert small.dtype == np.uint8 and set(np.unique(small)) <= {0, 1}
    np.testing.assert_array_equal(small, mask[::2, ::2])
    with pytest.raises(ValueError, match="axes"):
        resize_mask(mask, (4, 4, 4))


def test_coverage_and_mapping_back_keep_the_outline() -> None:
    truth = disc((256, 256), (100.3, 140.7), 18.0)
    coverage = mask_coverage(truth, (128, 128))
    assert coverage.dtype == np.float32 and 0.0 <= coverage.min() and coverage.max() <= 1.0
    assert math.isclose(coverage.sum() * 4, truth.sum(), rel_tol=1e-4)  # area is preserved
    back = to_source_grid(coverage, truth.shape)
    assert back.shape == truth.shape
    assert case_metrics(back, truth).jaccard > 0.95
    nearest = to_source_grid(resize_mask(truth, (128, 128)).astype(np.float32), truth.shape)
    assert case_metrics(nearest, truth).jaccard < case_metrics(back, truth).jaccard
    volume = disc((16, 32, 32), (8, 16, 16), 6.0)
    assert to_source_grid(mask_coverage(volume, (8, 16, 16)), volume.shape).shape == volume.shape


def test_postprocess_keeps_the_largest_component_and_fills_holes() -> None:
    mask = disc((64, 64), (30, 30), 10)
    mask[28:33, 28:33] = 0  # a hole
    mask[2:5, 2:5] = 1  # a speck elsewhere
    out = postprocess(mask)
    assert out[30, 30] == 1 and out[3, 3] == 0
    np.testing.assert_array_equal(out, disc((64, 64), (30, 30), 10))
    assert not postprocess(np.zeros((8, 8))).any()


def test_metrics_on_known_shapes() -> None:
    a = np.zeros((20, 20), np.uint8)
    b = np.zeros((20, 20), np.uint8)
    a[0:10, 0:10] = 1  # 100 px
    b[0:10, 5:15] = 1  # 100 px, 50 overlap
    m = case_metrics(a, b, spacing=(0.5, 0.5))
    assert math.isclose(m.dice, 0.5, abs_tol=1e-6)
    assert math.isclose(m.jaccard, 50 / 150, abs_tol=1e-6)
    assert math.isclose(m.hd95_mm, 2.5, abs_tol=0.3)  # surfaces 5 px = 2.5 mm apart
    same = case_metrics(a, a)
    assert (same.dice, same.jaccard, same.hd95_mm) == (1.0, 1.0, 0.0)
    missed = case_metrics(np.zeros_like(a), a)
    assert missed.dice == 0.0 and missed.jaccard == 0.0 and math.isnan(missed.hd95_mm)


def _easy_cohort(tmp_path: Path, n: int = 48, size: int = 32) -> SegCohort:
    rng = np.random.default_rng(0)
    images, masks, paths = [], [], []
    for i in range(n):
        truth = disc((size * 2, size * 2), tuple(rng.uniform(16, 48, 2)), float(rng.uniform(6, 12)))
        image = truth * 0.6 + rng.normal(0.2, 0.08, truth.shape)
        small = np.asarray(torch.nn.functional.avg_pool2d(torch.from_numpy(image[None].astype(np.float32)), 2))
        images.append(small)
        masks.append(mask_coverage(truth, (size, size))[None])
        paths.append(tmp_path / f"m{i}.npy")
        np.save(paths[-1], truth)
    return SegCohort(patient_ids=tuple(f"P{i}" for i in range(n)), labels=np.arange(n) % 2,
                     images=np.stack(images).astype(np.float32), masks=np.stack(masks),
                     mask_paths=tuple(paths), spacing=np.ones((n, 2)))


def test_a_tiny_training_run_learns(tmp_path: Path) -> None:
    cohort = _easy_cohort(tmp_path)
    torch.manual_seed(0)
    net = build_segnet("unet", 2, features=(4, 8, 16))
    idx = np.arange(len(cohort))
    settings = SegFitSettings(batch_size=8, learning_rate=1e-2, max_epochs=12, patience=12, augment=False)
    fit_segnet(net, cohort, idx[:32], idx[32:40], settings, seed=0)
    preds = predict_cases(net, cohort, idx[40:], 0.5, (32, 32))
    dice = np.mean([case_metrics(preds[i], cohort.source_mask(i)).dice for i in idx[40:]])
    assert dice > 0.8, dice


def test_both_architectures_in_2d_and_3d() -> None:
    for arch in ("unet", "segresnet"):
        for dims, shape in ((2, (1, 1, 32, 32)), (3, (1, 1, 16, 32, 32))):
            out = build_segnet(arch, dims, features=(8, 16, 32))(torch.zeros(shape))
            assert out.shape == (1, 2, *shape[2:])
    with pytest.raises(ValueError, match="unknown"):
        build_segnet("segnet", 2)


def test_segmenter_card_round_trip_and_classifier_card_key(tmp_path: Path) -> None:
    net = build_segnet("unet", 2, features=(4, 8, 16))
    weights = tmp_path / "seg" / "weights.pt"
    weights.parent.mkdir()
    torch.save(net.state_dict(), weights)
    card = SegmenterCard(name="lesionseg", version="0.1.0", weights=weights, sha256=sha256_file(weights),
                         arch="unet", features=(4, 8, 16), image=SegInput(2, (32, 32)), threshold=0.5,
                         metrics={"cv_dice_mean": 0.9}, path=weights.parent / "card.toml")
    write_segmenter_card(card, card.path)
    back = load_segmenter_card(card.path)
    assert (back.weights, back.features, back.segment.type_code, back.metrics) == (
        weights.resolve(), (4, 8, 16), "52988006", {"cv_dice_mean": 0.9})
    seg = Segmenter.load(card.path)
    out = seg.segment(np.random.default_rng(0).random((1, 64, 64)).astype(np.float32))
    assert out.mask.shape == (64, 64) and out.mask.dtype == np.uint8
    text = card.path.read_text().replace('arch = "unet"', 'arch = "unet"\nthreshhold = 0.4')
    card.path.write_text(text)
    with pytest.raises(ModelCardError, match="threshhold"):
        load_segmenter_card(card.path)

    classifier = default_card(weights=weights, sha256=sha256_file(weights), path=tmp_path / "card.toml")
    assert classifier.segmenter is None
    write_card(classifier, classifier.path)
    assert "segmenter" not in classifier.path.read_text()
    with_seg = default_card(weights=weights, sha256=sha256_file(weights), path=tmp_path / "card.toml")
    object.__setattr__(with_seg, "segmenter", card.path)
    write_card(with_seg, with_seg.path)
    assert 'segmenter = "seg/card.toml"' in with_seg.path.read_text()
    assert load_card(with_seg.path).segmenter == card.path.resolve()


def test_cross_validation_report_and_seeded_reproducibility(tmp_path: Path) -> None:
    from dicom_fusion.inference.report.segmentation import save_arch_result, write_seg_report
    from dicom_fusion.inference.train.segmenter import cross_validate_segmenter

    cohort = _easy_cohort(tmp_path, n=24)
    settings = SegFitSettings(batch_size=8, max_epochs=2, patience=2)
    runs = [cross_validate_segmenter(cohort, arch="unet", folds=2, seed=5, settings=settings,
                                     features=(4, 8, 16), progress=False) for _ in range(2)]
    assert [c.metrics for c in runs[0].cases] == [c.metrics for c in runs[1].cases]  # same seed, same result
    assert sorted(c.index for c in runs[0].cases) == list(range(24))  # every case held out once
    save_arch_result(runs[0], cohort, tmp_path / "report", cohort_name="easy")
    report = write_seg_report(tmp_path / "report")
    text = report.read_text()
    assert "| unet |" in text and "overlay-unet-worst.png" in text and " ± " in text
    assert (tmp_path / "report" / "report.html").is_file()
    assert (tmp_path / "report" / "overlay-unet-median.png").stat().st_size > 1000


def test_volume_segmenter_uses_sliding_windows_and_returns_the_source_grid(tmp_path: Path) -> None:
    net = build_segnet("unet", 3, features=(4, 8, 16))
    weights = tmp_path / "weights.pt"
    torch.save(net.state_dict(), weights)
    card = SegmenterCard(name="ctseg", version="0.0.1", weights=weights, sha256=sha256_file(weights), arch="unet",
                         features=(4, 8, 16), image=SegInput(3, (16, 32, 32), window=(-1000.0, 400.0),
                                                             roi_size=(16, 16, 16)),
                         threshold=0.5, path=tmp_path / "card.toml")
    write_segmenter_card(card, card.path)
    assert load_segmenter_card(card.path).roi() == (16, 16, 16)
    seg = Segmenter.load(card.path)
    volume = np.random.default_rng(1).normal(-800, 50, (1, 20, 48, 40)).astype(np.float32)
    out = seg.segment(volume)
    assert out.mask.shape == (20, 48, 40) and set(np.unique(out.mask)) <= {0, 1}
