"""EHR events -> the fixed-size tensor the LSTM branch reads.

Binning scheme (the card's `TimelineSpec` gives window_days and bin_days):

* The window is [study_time - window_days, study_time], both ends included; later events are
  ignored (they were not known when the study was acquired).
* Bins count back from the study: bin 0 back covers ages [0, bin_days) days, bin 1 back
  [bin_days, 2 * bin_days), ...; `spec.n_bins = ceil(window_days / bin_days)` bins, the oldest possibly
  partial. Rows are ordered oldest first, so the last valid row is always the bin of the study and the
  LSTM's final state is "the patient at the time of the study".
* Leading empty bins are dropped: row 0 is the oldest bin holding a matching event, and `length` =
  number of rows from there up to and including the study bin. Rows from `length` on are zero padding,
  so every tensor has shape [spec.n_bins, F] and batches stack without a collate step.
* Observation features: mean of the values in the bin, scaled (v - mean) / std; mask 1 where observed.
  Unobserved values are forward-filled from the last observed bin, and 0 (= the feature mean after
  scaling) before the first; their mask stays 0 so the network can tell imputed from measured.
* Count features (condition / medication / encounter): number of matching events in the bin, scaled the
  same way; a count is always known (no event = 0), so its mask is 1 on every valid row.
* deltas[t] = bins (= days / bin_days) since the previous row that held any matching event; 0 on row 0.

`encode_timeline` returns None when no event in the window matches a feature: the caller then predicts
image-only, the same path as "no patient in the EHR".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

import numpy as np

from dicom_fusion.inference.card.model import ANY, TimelineFeature, TimelineSpec

SECONDS_PER_DAY = 86_400.0


@runtime_checkable
class EventLike(Protocol):
    """Any object with these fields is an event (e.g. `dicom_fusion.fhir.events.TimelineEvent`).

    `kind` is observation | condition | medication | encounter; `time` should be timezone-aware
    (naive times are taken as UTC); `value` is the numeric value of an observation, else None.
    An optional `unit` attribute, when present and not None, must equal the feature's unit.
    """

    @property
    def kind(self) -> str: ...

    @property
    def system(self) -> str: ...

    @property
    def code(self) -> str: ...

    @property
    def time(self) -> datetime: ...

    @property
    def value(self) -> float | None: ...


@dataclass(frozen=True, eq=False)
class TimelineTensor:
    """Encoded timeline of one patient; rows >= `length` are zero padding (see module docstring)."""

    values: np.ndarray  # [T, F] float32, scaled and imputed
    mask: np.ndarray  # [T, F] float32, 1 = observed in that bin
    deltas: np.ndarray  # [T] float32, bins since the previous row with an event
    length: int


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _unit_ok(feature: TimelineFeature, event: EventLike) -> bool:
    unit = getattr(event, "unit", None)
    return unit is None or feature.unit is None or str(unit).casefold() == feature.unit.casefold()


def _matching(features: Sequence[TimelineFeature], event: EventLike) -> list[int]:
    out = []
    for j, f in enumerate(features):
        if f.kind != event.kind:
            continue
        if f.code != ANY and (f.code != event.code or (f.system != ANY and f.system != event.system)):
            continue
        if f.kind == "observation" and (
            event.value is None or not math.isfinite(float(event.value)) or not _unit_ok(f, event)
        ):
            continue
        out.append(j)
    return out


def read_by(spec: TimelineSpec) -> Callable[[EventLike], bool]:
    """Whether an event counts in some feature of `spec` (the test `encode_timeline` applies): an event it
    rejects changes nothing in the tensor, so a reader may drop it at once instead of keeping it (a
    timeline of 200 000 Observations of codes the model does not read costs nothing)."""
    features = spec.features
    return lambda event: bool(_matching(features, event))


def encode_timeline(
    events: Sequence[EventLike], study_time: datetime, spec: TimelineSpec
) -> TimelineTensor | None:
    """Bin, aggregate, scale and impute `events` per `spec`; None when no matching event is in the window."""
    study_time = _aware(study_time)
    features = spec.features
    n_bins, n_feat = spec.n_bins, len(features)
    sums = np.zeros((n_bins, n_feat), dtype=np.float64)
    counts = np.zeros((n_bins, n_feat), dtype=np.float64)
    for event in events:
        age_days = (study_time - _aware(event.time)).total_seconds() / SECONDS_PER_DAY
        if age_days < 0 or age_days > spec.window_days:
            continue
        row = n_bins - 1 - min(int(age_days // spec.bin_days), n_bins - 1)
        for j in _matching(features, event):
            counts[row, j] += 1
            sums[row, j] += float(event.value) if features[j].kind == "observation" else 1.0  # type: ignore[arg-type]
    has_event = counts.sum(axis=1) > 0
    if not has_event.any():
        return None
    first = int(np.argmax(has_event))
    length = n_bins - first

    mean = np.array([f.mean for f in features])
    std = np.array([f.std for f in features])
    is_count = np.array([f.is_count for f in features])
    window = slice(first, n_bins)
    raw = np.where(
        is_count,
        sums[window],
        np.divide(sums[window], counts[window], out=np.zeros_like(sums[window]), where=counts[window] > 0),
    )
    scaled = (raw - mean) / std
    observed = np.where(is_count, True, counts[window] > 0)

    filled = np.zeros_like(scaled)
    last = np.zeros(n_feat)  # the feature mean, in scaled units
    for t in range(length):
        last = np.where(observed[t], scaled[t], last)
        filled[t] = last

    deltas = np.zeros(length)
    last_event = 0
    for t in range(1, length):
        deltas[t] = t - last_event
        if has_event[first + t]:
            last_event = t

    values = np.zeros((n_bins, n_feat), dtype=np.float32)
    mask = np.zeros((n_bins, n_feat), dtype=np.float32)
    out_deltas = np.zeros(n_bins, dtype=np.float32)
    values[:length] = filled
    mask[:length] = observed
    out_deltas[:length] = deltas
    return TimelineTensor(values=values, mask=mask, deltas=out_deltas, length=length)


def rescale_timeline(tensor: TimelineTensor, source: TimelineSpec, target: TimelineSpec) -> TimelineTensor:
    """The tensor `encode_timeline` would have made with `target`'s scaling from the events it made
    `tensor` from with `source`'s: each value carried back to its raw unit and scaled again.

    Why: the members of an ensemble were trained with the scaler of their own fold (same features, other
    means and standard deviations), while the timeline stage encodes once, with the ensemble card's. A
    value before the feature's first observation is the imputed mean (0) under either scaling and stays
    0; counts are always observed. Raises ValueError when the two specs do not describe the same
    features and bins (a member of another model).
    """
    same = (source.window_days, source.bin_days, [(f.name, f.kind, f.unit) for f in source.features]) == (
        target.window_days, target.bin_days, [(f.name, f.kind, f.unit) for f in target.features])
    if not same:
        raise ValueError("the two timeline specs differ in window, bins or features; a tensor can only be "
                         "rescaled between scalers of the same features (ensemble members of one model)")
    s_mean, s_std = (np.array([getattr(f, k) for f in source.features]) for k in ("mean", "std"))
    t_mean, t_std = (np.array([getattr(f, k) for f in target.features]) for k in ("mean", "std"))
    is_count = np.array([f.is_count for f in source.features])
    n = tensor.length
    seen = np.maximum.accumulate(tensor.mask[:n] > 0, axis=0) | is_count  # measured at or before this row
    raw = tensor.values[:n].astype(np.float64) * s_std + s_mean
    values = np.zeros_like(tensor.values)
    values[:n] = np.where(seen, (raw - t_mean) / t_std, 0.0)
    return TimelineTensor(values=values, mask=tensor.mask.copy(), deltas=tensor.deltas.copy(), length=n)


__all__ = ["EventLike", "TimelineTensor", "encode_timeline", "read_by", "rescale_timeline"]
