"""The drift items of one study: the values card/drift.py compares with the model card's reference.

One function (`drift_items`) computes them for the reference (`reference_from_cohort`, behind `dicom-fusion
model reference`) and for every production job (the service's infer stage), so the two cannot differ:

* `image.mean`, `image.std`: mean and standard deviation of the decoded pixels in modality units, before
  normalisation (`PreparedImage.intensity_mean|std`): the network input is normalised per image, so a
  scanner or vendor whose intensity scale changed is invisible after it, but not here;
* `coverage.<feature>`: 1 when the card's timeline feature holds an observed value in the window (an
  observation measured, a condition / medication / encounter counted), else 0; 0 for every feature when
  the study had no timeline (no patient, no events, EHR unavailable): a lab that stops arriving shows here;
* `value.<feature>`: its last observed value in the window, scaled as the network reads it ((v - mean) /
  std of the card), only when observed;
* `probability`: the calibrated probability of the card's positive class.

Values only: nothing in an item identifies a patient. numpy only (no torch): the service imports this in
its infer stage, `reference_from_cohort` takes the loaded predictor as an argument.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.progress import track

from dicom_fusion.inference.card.drift import DEFAULT_BINS, DEFAULT_WINDOW, DriftReference, build_reference
from dicom_fusion.inference.card.model import ModelCard, TimelineSpec
from dicom_fusion.inference.data.cohort import BundleEventReader, read_bundle_events, read_cohort_csv
from dicom_fusion.inference.data.images import load_study_image
from dicom_fusion.inference.data.timeline_tensor import TimelineTensor, encode_timeline

if TYPE_CHECKING:
    from dicom_fusion.inference.serve.predict import InferenceResult, Predictor

IMAGE_MEAN = "image.mean"
IMAGE_STD = "image.std"
PROBABILITY = "probability"


def timeline_items(spec: TimelineSpec, tensor: TimelineTensor | None) -> dict[str, float]:
    """`coverage.<name>` for every feature of `spec`, `value.<name>` for those observed (module docstring)."""
    items: dict[str, float] = {}
    for j, feature in enumerate(spec.features):
        observed: np.ndarray = np.zeros(0, dtype=bool)
        if tensor is not None and tensor.length > 0:
            values = tensor.values[: tensor.length, j].astype(np.float64)
            if feature.is_count:  # mask is 1 on every row of a count: observed = at least one event in the bin
                observed = values * feature.std + feature.mean >= 0.5
            else:
                observed = tensor.mask[: tensor.length, j] > 0
        items[f"coverage.{feature.name}"] = float(observed.any())
        if observed.any():
            last = int(np.flatnonzero(observed)[-1])
            items[f"value.{feature.name}"] = float(tensor.values[last, j])  # type: ignore[union-attr]
    return items


def positive_probability(card: ModelCard, result: InferenceResult) -> float:
    """The calibrated probability of the card's positive class in `result`."""
    return float(next(p.probability for p in result.probabilities if p.name == card.positive_class))


def drift_items(
    card: ModelCard, *, intensity_mean: float, intensity_std: float, timeline: TimelineTensor | None,
    probability: float,
) -> dict[str, float]:
    """Every drift item of one study (module docstring), keyed by item name; a non-finite value is left out."""
    items = {IMAGE_MEAN: float(intensity_mean), IMAGE_STD: float(intensity_std), PROBABILITY: float(probability),
             **timeline_items(card.timeline, timeline)}
    return {name: value for name, value in items.items() if math.isfinite(value)}


def cohort_items(
    predictor: Predictor, cohort_dir: Path, *, read_events: BundleEventReader, progress: bool = True,
) -> list[dict[str, float]]:
    """The drift items of every patient of a cohort folder (cohort.csv, studies, bundles as `dicom-fusion
    synth` writes them), through the serving path: `load_study_image`, the bundle read by `read_events` and
    encoded with the card's scaler, the predictor's calibrated probability."""
    card = predictor.card
    records = read_cohort_csv(Path(cohort_dir))
    out = []
    for r in track(records, description="Computing drift items", disable=not progress,
                   console=Console(stderr=True), transient=True):
        image = load_study_image(sorted(r.study_dir.glob("*.dcm")), card)
        events = read_bundle_events(r.bundle_path, card.timeline, read_events=read_events)
        tensor = encode_timeline(events, r.study_time, card.timeline)
        result = predictor.predict(image, tensor)
        out.append(drift_items(card, intensity_mean=image.intensity_mean, intensity_std=image.intensity_std,
                               timeline=tensor, probability=positive_probability(card, result)))
    return out


def samples_of(rows: list[dict[str, float]]) -> dict[str, list[float]]:
    """Per-study item dicts -> one sample per item (an item a study lacks, e.g. an unobserved value, is
    left out of that item's sample)."""
    samples: dict[str, list[float]] = {}
    for row in rows:
        for name, value in row.items():
            samples.setdefault(name, []).append(value)
    return samples


def reference_from_cohort(
    predictor: Predictor, cohort_dir: Path, *, read_events: BundleEventReader, bins: int = DEFAULT_BINS,
    window: int = DEFAULT_WINDOW, progress: bool = True,
) -> DriftReference:
    """The drift reference of `predictor`'s card from every patient of a cohort (`cohort_items`)."""
    rows = cohort_items(predictor, cohort_dir, read_events=read_events, progress=progress)
    source = f"{Path(cohort_dir).resolve().name} ({len(rows)} patients)"
    return build_reference(samples_of(rows), bins, window=window, source=source)


__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "PROBABILITY",
    "cohort_items",
    "drift_items",
    "positive_probability",
    "reference_from_cohort",
    "samples_of",
    "timeline_items",
]
