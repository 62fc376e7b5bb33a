"""Traditional baselines for the comparison table: scikit-learn models on hand-made tabular features.

The features are what a data scientist would try before a neural network: per lab the last value,
mean, slope per year and number of measurements in the card's window; per event kind the count in
the window and in its last 180 days; and simple statistics of the prepared image (intensity moments,
percentiles, bright-area share, edge strength). Missing values stay NaN: the logistic regression
imputes them (median) and scales inside its pipeline, fitted on the training fold only; gradient
boosting handles NaN natively.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dicom_fusion.inference.card.model import ANY, TimelineSpec
from dicom_fusion.inference.data.timeline_tensor import EventLike

BASELINES = ("logistic_regression", "gradient_boosting")
WITH_LESION_AREA = "+lesion_area"
"""Suffix of a baseline variant that also gets the segmenter's lesion area (see `lesion_area`)."""
RECENT_DAYS = 180
IMAGE_FEATURES = ("img_mean", "img_std", "img_p50", "img_p95", "img_p99", "img_bright", "img_edges")


def _timeline_row(events: Sequence[EventLike], study_time: datetime, spec: TimelineSpec) -> list[float]:
    row: list[float] = []
    for f in spec.features:
        picked = []
        for e in events:
            age = (study_time - e.time).total_seconds() / 86_400.0
            if not 0 <= age <= spec.window_days or e.kind != f.kind:
                continue
            if f.code != ANY and (e.code != f.code or (f.system != ANY and e.system != f.system)):
                continue
            if f.kind == "observation" and (e.value is None or not math.isfinite(float(e.value))):
                continue
            picked.append((age, float(e.value) if f.kind == "observation" else 1.0))  # type: ignore[arg-type]
        if f.kind != "observation":
            row += [float(len(picked)), float(sum(1 for age, _ in picked if age <= RECENT_DAYS))]
            continue
        if not picked:
            row += [math.nan, math.nan, math.nan, 0.0]
            continue
        ages = np.array([a for a, _ in picked])
        values = np.array([v for _, v in picked])
        slope = float(np.polyfit(-ages / 365.25, values, 1)[0]) if np.ptp(ages) > 1.0 else math.nan
        row += [float(values[np.argmin(ages)]), float(values.mean()), slope, float(len(values))]
    return row


def _image_row(image: np.ndarray) -> list[float]:
    x = np.asarray(image, dtype=np.float64)
    gradients = np.gradient(x[0]) if x.shape[0] == 1 else np.gradient(x.mean(axis=0))
    edges = float(np.mean(np.sqrt(sum(g**2 for g in gradients))))
    p50, p95, p99 = np.percentile(x, [50, 95, 99])
    return [
        float(x.mean()),
        float(x.std()),
        float(p50),
        float(p95),
        float(p99),
        float((x > 0.7).mean()),
        edges,
    ]


def lesion_area(network_images: np.ndarray) -> np.ndarray:
    """[N] share of the image the lesion channel covers: the mean of the last channel of network input
    built with a lesion channel (`guide.with_lesion_channel`), i.e. of the segmenter's probability."""
    channel = np.asarray(network_images)[:, -1]
    return np.asarray(channel.reshape(len(channel), -1).mean(axis=1), dtype=np.float64)


def feature_names(spec: TimelineSpec) -> list[str]:
    names = []
    for f in spec.features:
        if f.kind == "observation":
            names += [f"{f.name}_last", f"{f.name}_mean", f"{f.name}_slope", f"{f.name}_n"]
        else:
            names += [f"{f.name}_n", f"{f.name}_n_{RECENT_DAYS}d"]
    return names + list(IMAGE_FEATURES)


def tabular_features(
    images: np.ndarray,
    events: Sequence[Sequence[EventLike]],
    study_times: Sequence[datetime],
    spec: TimelineSpec,
) -> np.ndarray:
    """[N, D] float64 feature matrix (NaN = missing), columns named by `feature_names(spec)`."""
    rows = [
        _timeline_row(e, t, spec) + _image_row(img)
        for img, e, t in zip(images, events, study_times, strict=True)
    ]
    return np.asarray(rows, dtype=np.float64)


def make_baseline(name: str, seed: int) -> object:
    """An unfitted sklearn estimator; class-balanced like the network's weighted loss."""
    if name == "logistic_regression":
        return make_pipeline(
            SimpleImputer(strategy="median", keep_empty_features=True),
            StandardScaler(),
            LogisticRegression(class_weight="balanced", max_iter=2000),
        )
    if name == "gradient_boosting":
        return HistGradientBoostingClassifier(
            learning_rate=0.05, max_iter=200, max_leaf_nodes=15, class_weight="balanced", random_state=seed
        )
    raise ValueError(f"unknown baseline {name!r}; use one of {', '.join(BASELINES)}")


def baseline_probs(
    features: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    name: str,
    seed: int,
) -> np.ndarray:
    """Fit baseline `name` on the training rows, return positive-class probabilities of the test rows."""
    model = make_baseline(name, seed)
    model.fit(features[train_idx], labels[train_idx])  # type: ignore[attr-defined]
    probs: np.ndarray = model.predict_proba(features[test_idx])[:, 1]  # type: ignore[attr-defined]
    return probs


__all__ = [
    "BASELINES",
    "WITH_LESION_AREA",
    "baseline_probs",
    "feature_names",
    "lesion_area",
    "make_baseline",
    "tabular_features",
]
