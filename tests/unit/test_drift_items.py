"""A study's drift items (inference/serve/drift_items.py): timeline coverage and last values, per feature kind."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicom_fusion.inference.card.model import DEFAULT_TIMELINE, LOINC, default_card
from dicom_fusion.inference.data.cohort import EhrEvent
from dicom_fusion.inference.data.timeline_tensor import encode_timeline
from dicom_fusion.inference.serve.drift_items import drift_items, timeline_items

STUDY = datetime(2025, 6, 1, tzinfo=UTC)


def _glucose(days_before: int, value: float) -> EhrEvent:
    return EhrEvent("observation", LOINC, "2345-7", STUDY - timedelta(days=days_before), value, "mg/dL")


def test_coverage_and_last_scaled_value_per_feature() -> None:
    events = [_glucose(300, 90.0), _glucose(40, 130.0),
              EhrEvent("condition", "http://snomed.info/sct", "44054006", STUDY - timedelta(days=200), None),
              EhrEvent("encounter", "x", "AMB", STUDY - timedelta(days=5), None)]
    tensor = encode_timeline(events, STUDY, DEFAULT_TIMELINE)
    items = timeline_items(DEFAULT_TIMELINE, tensor)
    names = [f.name for f in DEFAULT_TIMELINE.features]
    assert {k for k in items if k.startswith("coverage.")} == {f"coverage.{n}" for n in names}
    assert items["coverage.glucose"] == 1.0 and items["value.glucose"] == pytest.approx((130.0 - 105.0) / 25.0)
    assert items["coverage.hba1c"] == 0.0 and "value.hba1c" not in items  # never measured: no value
    # counts: covered when an event was counted; the value is the last bin that counted one (scaled)
    assert items["coverage.conditions"] == 1.0 and items["value.conditions"] == pytest.approx((1 - 0.1) / 0.35)
    assert items["coverage.encounters"] == 1.0 and items["value.encounters"] == pytest.approx((1 - 0.3) / 0.5)
    assert items["coverage.medications"] == 0.0 and "value.medications" not in items


def test_no_timeline_covers_nothing() -> None:
    items = timeline_items(DEFAULT_TIMELINE, None)
    assert set(items.values()) == {0.0} and not any(k.startswith("value.") for k in items)


def test_drift_items_of_a_study() -> None:
    card = default_card(weights=Path("w.pt"), sha256="0" * 64, path=Path("card.toml"))
    items = drift_items(card, intensity_mean=1200.0, intensity_std=float("nan"), timeline=None, probability=0.3)
    assert items["image.mean"] == 1200.0 and items["probability"] == 0.3
    assert "image.std" not in items  # a non-finite value is left out, never stored as NaN
