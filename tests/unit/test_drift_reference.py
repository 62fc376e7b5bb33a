"""Drift reference (inference/card/drift.py): histograms, PSI, thresholds, the card's [drift] table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from dicom_fusion.inference.card.drift import (
    DRIFT,
    WATCH,
    DriftReference,
    ReferenceHistogram,
    build_reference,
    histogram_of,
    psi,
    status,
)
from dicom_fusion.inference.card.document import card_document
from dicom_fusion.inference.card.model import default_card, load_card, sha256_file, write_card
from dicom_fusion.inference.errors import ModelCardError


def _sample(seed: int, n: int = 2000, loc: float = 100.0, scale: float = 20.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, scale, n)


def test_identical_sample_is_stable_and_shift_is_drift() -> None:
    ref = histogram_of(_sample(0))
    assert len(ref.shares) == 10 and sum(ref.shares) == pytest.approx(1.0)
    assert all(s == pytest.approx(0.1, abs=0.01) for s in ref.shares)  # quantile edges: equal shares
    assert psi(ref, _sample(0)) == pytest.approx(0.0, abs=1e-9)
    same_population = psi(ref, _sample(1))
    assert same_population < 0.02 and status(same_population) == "stable"
    shifted = psi(ref, _sample(2, loc=130.0))  # 1.5 standard deviations
    assert shifted > DRIFT and status(shifted) == "drift"
    scaled = psi(ref, _sample(3) * 3)  # pixel values x 3: every value beyond the top edge
    assert scaled > 5.0  # the empty reference bins are floored at EPSILON, not infinite
    assert np.isfinite(scaled)


def test_values_outside_the_edges_count_in_the_end_bins() -> None:
    ref = ReferenceHistogram(edges=(0.0, 1.0, 2.0), shares=(0.5, 0.5))
    assert ref.bin_counts([-5.0, 0.5, 1.0, 2.0, 9.0, float("nan")]).tolist() == [2.0, 3.0]
    assert np.isnan(psi(ref, []))


def test_binary_items_get_two_bins_levels_one_each_and_constant_ones_three() -> None:
    coverage = histogram_of([1, 1, 1, 0] * 25)
    assert coverage.edges == (0.0, 0.5, 1.0) and coverage.shares == pytest.approx((0.25, 0.75))
    assert psi(coverage, [0] * 40) > DRIFT  # the lab went missing
    assert psi(coverage, [1, 1, 1, 0] * 10) == pytest.approx(0.0, abs=1e-9)
    levels = histogram_of([2.5, 5.5, 5.5, 8.5] * 10)  # a scaled count: one bin per level
    assert levels.edges == (1.0, 4.0, 7.0, 10.0) and levels.shares == pytest.approx((0.25, 0.5, 0.25))
    assert psi(levels, [2.5] * 20) > DRIFT
    constant = histogram_of([3.0] * 50)
    assert constant.shares == (0.0, 1.0, 0.0)
    assert psi(constant, [3.0] * 10) == pytest.approx(0.0, abs=1e-9)
    assert psi(constant, [2.0] * 10) > DRIFT and psi(constant, [4.0] * 10) > DRIFT


def test_status_thresholds() -> None:
    assert (status(0.0), status(WATCH - 1e-9), status(WATCH), status(DRIFT), status(DRIFT + 1e-9)) == (
        "stable", "stable", "watch", "watch", "drift")


def test_build_reference_leaves_out_items_without_values() -> None:
    ref = build_reference({"image.mean": _sample(0), "value.crp": [float("nan")], "coverage.crp": [0, 1]},
                          bins=5, window=50)
    assert sorted(ref.items) == ["coverage.crp", "image.mean"]
    assert len(ref.items["image.mean"].shares) == 5 and ref.window == 50
    with pytest.raises(ValueError, match="bins"):
        histogram_of([1.0, 2.0], bins=1)


@pytest.fixture
def card_path(tmp_path: Path) -> Path:
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"bytes to hash")
    card = default_card(weights=weights, sha256=sha256_file(weights), path=tmp_path / "card.toml")
    drift = build_reference({"image.mean": _sample(0), "probability": np.random.default_rng(1).random(300),
                             "coverage.hba1c": [0, 1, 1]}, window=120, source="cohort x (300 patients)")
    card = dataclasses.replace(card, drift=drift)
    write_card(card, card.path)
    return card.path


def test_card_round_trip_with_drift_reference(card_path: Path) -> None:
    text = card_path.read_text()
    assert "[drift]" in text and '[drift.items."image.mean"]' in text
    card = load_card(card_path)
    assert card.drift is not None and card.drift.window == 120
    assert card.drift.items["coverage.hba1c"].shares == pytest.approx((1 / 3, 2 / 3))
    write_card(card, card_path.parent / "again.toml")
    assert dataclasses.replace(load_card(card_path.parent / "again.toml"), path=card.path) == card
    # a card written before drift monitoring has no table: None
    assert load_card(_without_drift(card_path)).drift is None
    document = card_document(card)
    assert "## Drift monitoring" in document and "Reference from cohort x (300 patients): 3 items" in document
    assert "last 120 jobs" in document
    assert "No reference" in card_document(load_card(_without_drift(card_path)))


def _without_drift(card_path: Path) -> Path:
    text = card_path.read_text()
    out = card_path.with_name("plain.toml")
    out.write_text(text[: text.index("[drift]")])
    return out


@pytest.mark.parametrize(("edges", "shares", "message"), [
    ("[0.0, 1.0, 2.0]", "[0.5, 0.4]", r'drift.items.image.mean shares must sum to 1, they sum to 0.9'),
    ("[0.0, 2.0, 1.0]", "[0.5, 0.5]", r"drift.items.image.mean edges must be finite and strictly increasing"),
    ("[0.0, 1.0, 2.0]", "[1.0]", r"drift.items.image.mean has 3 edges, so needs 2 shares"),
    ("[0.0, 1.0]", "[1.5]", r"drift.items.image.mean shares must be fractions in \[0, 1\]"),
    ("[0.0]", "[]", r"drift.items.image.mean needs at least 2 edges"),
])
def test_bad_histograms_are_refused_naming_the_key(card_path: Path, edges: str, shares: str, message: str) -> None:
    text = card_path.read_text()
    head = text[: text.index('[drift.items."image.mean"]')]
    tail = text[text.index('[drift.items.probability]'):]
    bad = f'[drift.items."image.mean"]\nedges = {edges}\nshares = {shares}\n\n'
    card_path.write_text(head + bad + tail)
    with pytest.raises(ModelCardError, match=message) as caught:
        load_card(card_path)
    assert str(card_path.resolve()) in str(caught.value)


def test_drift_table_errors() -> None:
    with pytest.raises(ModelCardError, match="drift histogram shares must sum to 1"):
        ReferenceHistogram(edges=(0.0, 1.0), shares=(0.5,))
    with pytest.raises(ModelCardError, match="drift.items is empty"):
        DriftReference(items={})
    with pytest.raises(ModelCardError, match="window"):
        DriftReference(items={"probability": histogram_of([0.1, 0.9])}, window=0)
