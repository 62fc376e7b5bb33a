"""Drift reference of a model card: what the model's inputs and outputs looked like on the cohort it was
validated on, and the population stability index (PSI) that compares production with it.

The card's `[drift]` table holds one histogram per item (`image.mean`, `image.std`, `probability`,
`coverage.<feature>`, `value.<feature>`; serve/drift_items.py computes them, the same way for the reference
and for production jobs) and `window`, how many recent jobs production compares. `dicom-fusion model
reference CARD --cohort DIR` writes the table; the service's ops/drift.py reads it.

PSI = sum over bins of (p - q) * ln(p / q), p the production shares, q the reference shares, both floored
at `EPSILON` so an empty bin does not make it infinite. Reading (the usual credit-scoring convention):
below 0.1 stable, 0.1 to 0.25 watch, above 0.25 drift. PSI is biased upwards on small samples (about
(bins - 1) / n for n production values when nothing moved), so it is only meaningful on a full window.

numpy only: the card must stay loadable without torch (the API reads it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import field_validator, model_validator

from dicom_fusion.inference.card.values import Finite, PositiveInt, Text, card_value
from dicom_fusion.inference.errors import ModelCardError

EPSILON = 1e-4
"""Floor of a bin's share in the PSI sum: an empty bin counts as 0.01 %, not as log(0)."""
WATCH = 0.1
"""PSI from here on: the distribution moved noticeably (status "watch")."""
DRIFT = 0.25
"""PSI above this: the population differs from the reference (status "drift"; deploy/prometheus alerts)."""
DEFAULT_BINS = 10
DEFAULT_WINDOW = 200
_SHARE_TOLERANCE = 1e-6

DriftStatus = Literal["stable", "watch", "drift"]


def _problem(edges: Sequence[Any], shares: Sequence[Any]) -> str | None:
    """What is wrong with a histogram, or None; shared by the table check (which names the key) and the
    value object's own validator."""
    try:
        e = np.asarray(edges, dtype=np.float64)
        s = np.asarray(shares, dtype=np.float64)
    except (TypeError, ValueError):
        return "edges and shares must be lists of numbers"
    if e.ndim != 1 or s.ndim != 1:
        return "edges and shares must be lists of numbers"
    if e.size < 2:
        return f"needs at least 2 edges (one bin), got {e.size}"
    if not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        return f"edges must be finite and strictly increasing, got {e.tolist()}"
    if s.size != e.size - 1:
        return f"has {e.size} edges, so needs {e.size - 1} shares (one per bin), got {s.size}"
    if not np.all(np.isfinite(s)) or np.any(s < 0) or np.any(s > 1):
        return f"shares must be fractions in [0, 1], got {s.tolist()}"
    if abs(float(s.sum()) - 1.0) > _SHARE_TOLERANCE:
        return f"shares must sum to 1, they sum to {float(s.sum()):.6g}"
    return None


@card_value
class ReferenceHistogram:
    """One item's reference distribution: bin `edges` (k + 1, strictly increasing) and the share of the
    reference sample in each of the k bins (sum 1). Bin i is [edges[i], edges[i+1]); the last includes its
    upper edge, and values outside the edges count in the end bins."""

    edges: tuple[Finite, ...]
    shares: tuple[Finite, ...]

    @model_validator(mode="after")
    def _valid(self) -> ReferenceHistogram:
        if (problem := _problem(self.edges, self.shares)) is not None:
            raise ModelCardError(f"drift histogram {problem}")
        return self

    def bin_counts(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """How many of `values` fall in each bin (out-of-range values in the end bins; NaN left out)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        index = np.searchsorted(np.asarray(self.edges[1:-1]), v, side="right")
        return np.bincount(index, minlength=len(self.shares)).astype(np.float64)


@card_value
class DriftReference:
    """The card's `[drift]` table: `window` = how many of a model's most recent jobs production compares
    with the reference; `items` = one histogram per item name (e.g. `[drift.items."image.mean"]`)."""

    items: dict[Text, ReferenceHistogram]
    window: PositiveInt = DEFAULT_WINDOW
    source: Text | None = None
    """Where the reference came from (cohort folder and patient count), for the card's reader."""

    @field_validator("items", mode="before")
    @classmethod
    def _histograms(cls, items: Any) -> Any:
        """Check each raw histogram here, where its item name is known, so the message names the key."""
        if isinstance(items, Mapping):
            for name, hist in items.items():
                if isinstance(hist, Mapping) and "edges" in hist and "shares" in hist:
                    if (problem := _problem(hist["edges"], hist["shares"])) is not None:
                        raise ModelCardError(f"drift.items.{name} {problem}")
        return items

    @model_validator(mode="after")
    def _not_empty(self) -> DriftReference:
        if not self.items:
            raise ModelCardError("drift.items is empty: build the reference with `dicom-fusion model reference`")
        return self


def _is_binary(v: np.ndarray) -> bool:
    return bool(np.all((v == 0.0) | (v == 1.0)))


def histogram_of(values: Sequence[float] | np.ndarray, bins: int = DEFAULT_BINS) -> ReferenceHistogram:
    """The reference histogram of one item's sample: quantile edges (about equal shares per bin, ties
    merged); 2 bins for a 0/1 item; one bin per level when the sample takes at most `bins` values (cut
    half-way between them); three bins around the value of a constant sample (so a move either way shows)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("no finite value to build a reference histogram from")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    distinct = np.unique(v)
    if _is_binary(v):
        edges = np.array([0.0, 0.5, 1.0])
    elif distinct.size == 1:
        c = float(distinct[0])
        spread = max(abs(c), 1.0) * 0.5
        edges = np.array([c - spread, c - spread * 1e-6, c + spread * 1e-6, c + spread])
    elif distinct.size <= bins:  # a few levels (e.g. a scaled count): one bin per level, cut half-way
        half = float(np.diff(distinct).min()) / 2
        edges = np.concatenate([[distinct[0] - half], (distinct[1:] + distinct[:-1]) / 2, [distinct[-1] + half]])
    else:
        edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, bins + 1)))
    shell = ReferenceHistogram(edges=tuple(float(e) for e in edges), shares=(1.0,) + (0.0,) * (len(edges) - 2))
    counts = shell.bin_counts(v)
    shares = counts / counts.sum()
    shares[-1] = max(0.0, 1.0 - float(shares[:-1].sum()))  # exact sum 1 after rounding
    return ReferenceHistogram(edges=shell.edges, shares=tuple(float(s) for s in shares))


def build_reference(
    samples: Mapping[str, Sequence[float]], bins: int = DEFAULT_BINS, *, window: int = DEFAULT_WINDOW,
    source: str | None = None,
) -> DriftReference:
    """A drift reference from each item's reference sample (items with no finite value are left out)."""
    items = {}
    for name in sorted(samples):
        values = np.asarray(samples[name], dtype=np.float64)
        if np.isfinite(values).any():
            items[name] = histogram_of(values, bins)
    return DriftReference(items=items, window=window, source=source)


def psi(reference: ReferenceHistogram, values: Sequence[float] | np.ndarray) -> float:
    """Population stability index of `values` against `reference`; NaN when `values` holds no finite value."""
    counts = reference.bin_counts(values)
    if counts.sum() == 0:
        return math.nan
    p = np.maximum(counts / counts.sum(), EPSILON)
    q = np.maximum(np.asarray(reference.shares, dtype=np.float64), EPSILON)
    return float(np.sum((p - q) * np.log(p / q)))


def status(value: float) -> DriftStatus:
    """stable (PSI < 0.1), watch (0.1 to 0.25), drift (> 0.25)."""
    if value > DRIFT:
        return "drift"
    if value >= WATCH:
        return "watch"
    return "stable"


__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_WINDOW",
    "DRIFT",
    "EPSILON",
    "WATCH",
    "DriftReference",
    "DriftStatus",
    "ReferenceHistogram",
    "build_reference",
    "histogram_of",
    "psi",
    "status",
]
