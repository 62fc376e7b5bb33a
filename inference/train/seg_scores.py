"""Per-case segmentation metrics with `monai.metrics`: Dice, Jaccard (IoU) and the 95th-percentile
Hausdorff distance in millimetres (surface distances scaled by the pixel spacing).

Conventions for empty masks, so a missed lesion is visible rather than dropped: Dice and Jaccard of an
empty prediction against a non-empty truth are 0 (both empty: 1); HD95 is undefined then and reported
as NaN (summaries count how many cases lack it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

METRICS = ("dice", "jaccard", "hd95_mm")


@dataclass(frozen=True)
class CaseMetrics:
    dice: float
    jaccard: float
    hd95_mm: float  # NaN when either mask is empty

    def as_dict(self) -> dict[str, float]:
        return {"dice": self.dice, "jaccard": self.jaccard, "hd95_mm": self.hd95_mm}


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))[None, None]


def case_metrics(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> CaseMetrics:
    """Metrics of one binary prediction against its truth (same grid); `spacing` in mm per axis."""
    if np.shape(prediction) != np.shape(truth):
        raise ValueError(f"prediction {np.shape(prediction)} and truth {np.shape(truth)} differ in shape")
    pred, true = _as_batch(prediction), _as_batch(truth)
    p_any, t_any = bool(pred.any()), bool(true.any())
    if not p_any or not t_any:
        same = float(p_any == t_any)
        return CaseMetrics(dice=same, jaccard=same, hd95_mm=math.nan)
    dice = float(DiceMetric(include_background=True, reduction="none")(pred, true).item())
    jaccard = float(MeanIoU(include_background=True, reduction="none")(pred, true).item())
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    hd95 = float(hd(pred, true, spacing=list(spacing) if spacing is not None else None).item())
    return CaseMetrics(dice=dice, jaccard=jaccard, hd95_mm=hd95)


def summarise_cases(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample sd, n) over the finite values."""
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan, 0
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0, int(arr.size)


__all__ = ["METRICS", "CaseMetrics", "case_metrics", "summarise_cases"]
