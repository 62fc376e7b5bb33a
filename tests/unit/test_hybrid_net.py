"""HybridNet forward shapes (2D/3D, every encoder), timeline gating, init_model determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dicom_fusion.inference.card.model import (
    DEFAULT_IMAGE,
    DEFAULT_TIMELINE,
    ImageSpec,
    default_card_path,
    load_card,
    sha256_file,
    verify_weights,
)
from dicom_fusion.inference.data.timeline_tensor import TimelineTensor
from dicom_fusion.inference.nets.hybrid import HybridNet, build_model, collate_timelines, init_model, main

T, F = DEFAULT_TIMELINE.n_bins, len(DEFAULT_TIMELINE.features)


def _batch(spec: ImageSpec, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, spec.channels, *spec.size, generator=g)
    values = torch.randn(batch, T, F, generator=g)
    mask = (torch.rand(batch, T, F, generator=g) > 0.5).float()
    deltas = torch.rand(batch, T, generator=g)
    lengths = torch.tensor([T, 3][:batch] + [1] * max(0, batch - 2))
    has_timeline = torch.tensor([True, False][:batch] + [True] * max(0, batch - 2))
    return image, values, mask, deltas, lengths, has_timeline


def _net(spec: ImageSpec) -> HybridNet:
    torch.manual_seed(0)
    return HybridNet(spec, F, 2).eval()


@pytest.mark.parametrize(
    "spec",
    [
        DEFAULT_IMAGE,
        ImageSpec(spatial_dims=3, size=(16, 32, 32), channels=1, window=None, encoder="smallcnn"),
        ImageSpec(spatial_dims=2, size=(64, 64), channels=3, window=None, encoder="densenet121"),
        ImageSpec(spatial_dims=2, size=(64, 64), channels=1, window=None, encoder="efficientnet-b0"),
    ],
    ids=["2d-smallcnn", "3d-smallcnn", "2d-densenet121", "2d-efficientnet-b0"],
)
def test_model_forward_shapes(spec: ImageSpec) -> None:
    net = _net(spec)
    with torch.inference_mode():
        logits = net(*_batch(spec))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_model_without_timeline_ignores_timeline_values() -> None:
    net = _net(DEFAULT_IMAGE)
    image, values, mask, deltas, lengths, _ = _batch(DEFAULT_IMAGE)
    off = torch.tensor([False, False])
    with torch.inference_mode():
        a = net(image, values, mask, deltas, lengths, off)
        b = net(image, values * 7 + 1, 1 - mask, deltas + 3, torch.tensor([0, 0]), off)  # length 0 is allowed
        c = net(image, values, mask, deltas, lengths, torch.tensor([True, True]))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_model_padding_beyond_length_is_ignored() -> None:
    net = _net(DEFAULT_IMAGE)
    image, values, mask, deltas, _, has = _batch(DEFAULT_IMAGE)
    lengths = torch.tensor([4, 4])
    noisy = values.clone()
    noisy[:, 4:] = 99.0
    with torch.inference_mode():
        torch.testing.assert_close(
            net(image, values, mask, deltas, lengths, has), net(image, noisy, mask, deltas, lengths, has)
        )


def test_model_trains_one_step() -> None:
    net = _net(DEFAULT_IMAGE).train()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(net(*_batch(DEFAULT_IMAGE, batch=4)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert all(p.grad is not None for p in net.lstm.parameters())
    optimiser.step()


def test_model_init_is_deterministic(tmp_path: Path) -> None:
    a = init_model(tmp_path / "a", seed=0)
    b = init_model(tmp_path / "b", seed=0)
    c = init_model(tmp_path / "c", seed=1)
    assert a.sha256 == b.sha256 != c.sha256
    assert load_card(a.path) == a
    verify_weights(a)
    assert a.weights.stat().st_size < 1_000_000
    state = torch.load(a.weights, weights_only=True)
    build_model(a).load_state_dict(state, strict=True)


def test_model_shipped_default_is_trained_and_verified(tmp_path: Path) -> None:
    """The packaged model is the trained one (README "Model"), not an init: its card names the sha256 of
    its weights, carries the cross-validated metrics, and its timeline scaler was fitted on data."""
    shipped = load_card(default_card_path())
    verify_weights(shipped)
    assert sha256_file(shipped.weights) == shipped.sha256 != init_model(tmp_path, seed=0).sha256
    for key in ("cv_roc_auc_mean", "cv_roc_auc_sd", "cv_no_ehr_roc_auc_mean", "cv_f1_mean", "cv_ece_mean",
                "n_patients", "cv_folds"):
        assert key in shipped.metrics, key
    assert 0.5 < shipped.metrics["cv_roc_auc_mean"] <= 1.0 and shipped.metrics["cv_folds"] >= 2
    assert shipped.timeline != DEFAULT_TIMELINE  # feature mean/std fitted, not the hand-set defaults
    assert shipped.weights.stat().st_size < 2_000_000
    build_model(shipped).load_state_dict(torch.load(shipped.weights, weights_only=True), strict=True)


def test_model_committed_report_meets_the_acceptance_bar() -> None:
    """docs/model-report is the shipped model's evaluation (README "Model"): its cross-validated fusion
    ROC-AUC clears both single branches by 0.05 and the traditional baselines; the card agrees with it."""
    import json

    report = Path(__file__).resolve().parents[2] / "docs" / "model-report" / "metrics.json"
    auc = {k: v["roc_auc"][0] for k, v in json.loads(report.read_text())["summary"].items()}
    assert auc["fusion"] >= auc["image"] + 0.05 and auc["fusion"] >= auc["timeline"] + 0.05
    assert auc["fusion"] > max(auc["logistic_regression"], auc["gradient_boosting"])
    shipped = load_card(default_card_path())
    assert shipped.metrics["cv_roc_auc_mean"] == pytest.approx(auc["fusion"], abs=1e-3)


def test_model_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--seed", "0"]) == 0
    assert "sha256" in capsys.readouterr().out
    assert (tmp_path / "card.toml").is_file() and (tmp_path / "weights.pt").is_file()


def test_model_collate_timelines_mixes_present_and_missing() -> None:
    tl = TimelineTensor(
        values=torch.ones(T, F).numpy(),
        mask=torch.ones(T, F).numpy(),
        deltas=torch.zeros(T).numpy(),
        length=4,
    )
    batch = collate_timelines([tl, None], DEFAULT_TIMELINE)
    assert batch.values.shape == (2, T, F) and batch.deltas.shape == (2, T)
    assert batch.lengths.tolist() == [4, 0] and batch.has_timeline.tolist() == [True, False]
    assert not batch.values[1].any()
    logits = _net(DEFAULT_IMAGE)(
        torch.zeros(2, 1, 128, 128), batch.values, batch.mask, batch.deltas, batch.lengths, batch.has_timeline
    )
    assert logits.shape == (2, 2)
    with pytest.raises(ValueError, match="encode_timeline"):
        collate_timelines([TimelineTensor(tl.values[:3], tl.mask[:3], tl.deltas[:3], 1)], DEFAULT_TIMELINE)
