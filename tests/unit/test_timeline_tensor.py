"""encode_timeline: window, bins (oldest first, study bin last), aggregation, masks, imputation, deltas."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from timeline_events import SPEC, STUDY, Event, condition, glucose

from dicom_fusion.inference.card.model import DEFAULT_TIMELINE, LOINC
from dicom_fusion.inference.data.timeline_tensor import EventLike, TimelineTensor, encode_timeline, read_by


def test_timeline_event_dataclass_is_eventlike() -> None:
    assert isinstance(glucose(1, 100), EventLike)


def test_timeline_none_without_events_in_window() -> None:
    assert encode_timeline([], STUDY, SPEC) is None
    outside = [glucose(91, 100), glucose(-1, 100), condition(400)]
    assert encode_timeline(outside, STUDY, SPEC) is None
    unmatched = [Event("observation", LOINC, "718-7", STUDY - timedelta(days=3), 13.0)]
    assert encode_timeline(unmatched, STUDY, SPEC) is None


def test_timeline_shape_is_fixed_and_padding_is_zero() -> None:
    tensor = encode_timeline([glucose(5, 120)], STUDY, SPEC)
    assert isinstance(tensor, TimelineTensor)
    assert tensor.values.shape == tensor.mask.shape == (3, 2) and tensor.deltas.shape == (3,)
    assert tensor.values.dtype == tensor.mask.dtype == tensor.deltas.dtype == np.float32
    assert tensor.length == 1  # only the study bin
    np.testing.assert_allclose(tensor.values[0], [2.0, -1.0])  # (120-100)/10 ; (0-0.5)/0.5
    np.testing.assert_array_equal(tensor.mask[0], [1, 1])
    assert not tensor.values[1:].any() and not tensor.mask[1:].any() and not tensor.deltas.any()


@pytest.mark.parametrize(
    ("days", "row", "length"), [(0, 0, 1), (29.9, 0, 1), (30, 0, 2), (59, 0, 2), (60, 0, 3), (90, 0, 3)]
)
def test_timeline_bins_count_back_from_study(days: float, row: int, length: int) -> None:
    tensor = encode_timeline([glucose(days, 110)], STUDY, SPEC)
    assert tensor is not None and tensor.length == length
    assert tensor.mask[row, 0] == 1  # the event is in the first (oldest kept) row
    assert tensor.mask[:length, 0].sum() == 1


def test_timeline_bin_mean_forward_fill_and_mask() -> None:
    events = [glucose(80, 100), glucose(70, 140), condition(75), condition(10), condition(12)]
    tensor = encode_timeline(events, STUDY, SPEC)
    assert tensor is not None and tensor.length == 3
    np.testing.assert_allclose(tensor.values[:, 0], [2.0, 2.0, 2.0])  # mean 120, then carried forward
    np.testing.assert_array_equal(tensor.mask[:, 0], [1, 0, 0])  # carried values are not "observed"
    np.testing.assert_allclose(tensor.values[:, 1], [1.0, -1.0, 3.0])  # counts 1, 0, 2
    np.testing.assert_array_equal(tensor.mask[:, 1], [1, 1, 1])  # counts are always known
    np.testing.assert_allclose(tensor.deltas, [0.0, 1.0, 2.0])  # row 2: two bins since row 0


def test_timeline_unobserved_before_first_value_is_mean() -> None:
    tensor = encode_timeline([condition(80), glucose(5, 90)], STUDY, SPEC)
    assert tensor is not None
    np.testing.assert_allclose(tensor.values[:, 0], [0.0, 0.0, -1.0])
    np.testing.assert_array_equal(tensor.mask[:, 0], [0, 0, 1])


def test_timeline_skips_wrong_unit_system_and_missing_value() -> None:
    events = [
        glucose(5, 6.0, unit="mmol/L"),
        glucose(5, 120, unit="MG/DL"),
        glucose(5, None),
        Event("observation", "http://example.org/local", "2345-7", STUDY - timedelta(days=5), 500.0),
    ]
    tensor = encode_timeline(events, STUDY, SPEC)
    assert tensor is not None
    assert tensor.values[0, 0] == pytest.approx(2.0)  # only the 120 mg/dL value


def test_timeline_naive_times_are_utc() -> None:
    naive = Event("observation", LOINC, "2345-7", (STUDY - timedelta(days=5)).replace(tzinfo=None), 120.0)
    a = encode_timeline([naive], STUDY.replace(tzinfo=None), SPEC)
    b = encode_timeline([glucose(5, 120)], STUDY, SPEC)
    assert a is not None and b is not None
    np.testing.assert_array_equal(a.values, b.values)


def test_timeline_other_timezones_compare_as_instants() -> None:
    cet = timezone(timedelta(hours=1))
    late = Event("observation", LOINC, "2345-7", datetime(2025, 3, 1, 12, 30, tzinfo=cet), 120.0)  # 11:30 UTC
    tensor = encode_timeline([late], STUDY, SPEC)
    assert tensor is not None and tensor.length == 1


def test_timeline_default_spec_shape() -> None:
    tensor = encode_timeline([glucose(400, 120), condition(3)], STUDY, DEFAULT_TIMELINE)
    assert tensor is not None
    assert tensor.values.shape == (25, len(DEFAULT_TIMELINE.features))
    assert tensor.length == 14  # 400 days back = bin 13 back -> rows 0..13
    assert tensor.deltas[tensor.length - 1] == 13


def test_read_by_drops_only_events_that_change_nothing() -> None:
    """The timeline stage keeps only events `read_by` accepts: the tensor must be the same without the rest."""
    other = Event("observation", LOINC, "718-7", STUDY - timedelta(days=5), 13.0, "g/dL")  # no feature reads it
    wrong_unit = glucose(8, 5.5, "mmol/L")
    events = [glucose(3, 110.0), other, condition(70), wrong_unit, glucose(40, None)]  # type: ignore[arg-type]
    keep = read_by(SPEC)
    kept = [e for e in events if keep(e)]
    assert kept == [events[0], events[2]]
    full, filtered = encode_timeline(events, STUDY, SPEC), encode_timeline(kept, STUDY, SPEC)
    assert full is not None and filtered is not None
    assert full.length == filtered.length
    for name in ("values", "mask", "deltas"):
        np.testing.assert_array_equal(getattr(full, name), getattr(filtered, name))
