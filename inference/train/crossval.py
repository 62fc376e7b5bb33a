"""Cross-validation: stratified folds by patient, per-fold scaler, seeded fits, held-out predictions.

No leakage: per fold, the timeline feature scaler (mean/std per feature, which also sets the value
imputed before a feature's first observation) is fitted on the training patients only, early stopping
looks at an inner split of the training patients, and the held-out fold is touched once, for its
predictions.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.model_selection import StratifiedKFold, train_test_split

from dicom_fusion.inference.card.model import ModelCard, TimelineSpec
from dicom_fusion.inference.data.cohort import Cohort
from dicom_fusion.inference.data.timeline_tensor import EventLike, TimelineTensor, encode_timeline
from dicom_fusion.inference.nets.hybrid import HybridNet, build_model, collate_timelines
from dicom_fusion.inference.serve.lesion_channel import load_guide, with_lesion_channel
from dicom_fusion.inference.train.config import TrainConfig
from dicom_fusion.inference.train.fitloop import MODES, EpochStats, FitData, fit, predict_positive
from dicom_fusion.inference.train.scores import binary_metrics

NO_EHR = "fusion_no_ehr"
"""Prediction variant: the fusion model with every timeline withheld (the service's image-only path)."""


# --------------------------------------------------------------------------- folds and scaling


def make_folds(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold split of patient positions: [(train, test)], every patient tested once."""
    labels = np.asarray(labels)
    smallest = int(np.bincount(labels).min()) if labels.size else 0
    if smallest < k:
        raise ValueError(
            f"{k}-fold cross-validation needs at least {k} patients of each label, the rarer label has "
            f"{smallest}; use fewer folds or a larger cohort"
        )
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(np.zeros(len(labels)), labels)]


def inner_split(
    labels: np.ndarray, idx: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) positions within `idx`, stratified; validation drives early stopping only."""
    fit_idx, val_idx = train_test_split(idx, test_size=fraction, stratify=labels[idx], random_state=seed)
    return np.sort(fit_idx), np.sort(val_idx)


def _unscaled(spec: TimelineSpec) -> TimelineSpec:
    features = tuple(dataclasses.replace(f, mean=0.0, std=1.0) for f in spec.features)
    return dataclasses.replace(spec, features=features)


def fit_timeline_scaler(
    events: Sequence[Sequence[EventLike]], study_times: Sequence[datetime], spec: TimelineSpec
) -> TimelineSpec:
    """`spec` with each feature's mean/std fitted on these patients' binned values.

    Observation features: over the bins where the feature was measured; count features: over every
    bin of the patients' timelines. A feature never seen keeps mean 0, std 1. Pass only the
    training patients of a fold: this is the one statistic of the timeline branch fitted on data.
    """
    raw = _unscaled(spec)
    columns: list[list[np.ndarray]] = [[] for _ in spec.features]
    for patient_events, when in zip(events, study_times, strict=True):
        tensor = encode_timeline(patient_events, when, raw)
        if tensor is None:
            continue
        rows = slice(0, tensor.length)
        for j in range(len(spec.features)):
            observed = tensor.mask[rows, j] > 0
            columns[j].append(tensor.values[rows, j][observed])
    features = []
    for feature, parts in zip(spec.features, columns, strict=True):
        values = np.concatenate(parts) if parts else np.zeros(0)
        mean = float(values.mean()) if values.size else 0.0
        std = float(values.std()) if values.size > 1 else 1.0
        features.append(dataclasses.replace(feature, mean=mean, std=std if std > 1e-6 else 1.0))
    return dataclasses.replace(spec, features=tuple(features))


def encode_timelines(
    events: Sequence[Sequence[EventLike]], study_times: Sequence[datetime], spec: TimelineSpec
) -> list[TimelineTensor | None]:
    """Every patient's timeline tensor under `spec` (None = no event in the window: image-only)."""
    return [encode_timeline(e, t, spec) for e, t in zip(events, study_times, strict=True)]


def network_images(cohort: Cohort, card: ModelCard) -> np.ndarray:
    """Every patient's image as the network reads it: with the card's lesion channel, if any."""
    return with_lesion_channel(cohort.images, load_guide(card))


def fit_data(
    cohort: Cohort, card: ModelCard, spec: TimelineSpec, images: np.ndarray | None = None
) -> FitData:
    """The cohort as tensors: `images` (default `network_images`; the lesion channel does not depend on
    the fold, so callers fitting several folds compute it once), timelines encoded with `spec` (a
    fold's fitted scaler)."""
    targets = np.where(cohort.labels == 1, card.positive_index, 1 - card.positive_index)
    return FitData(
        images=torch.from_numpy(images if images is not None else network_images(cohort, card)),
        timelines=collate_timelines(encode_timelines(cohort.events, cohort.study_times, spec), spec),
        targets=torch.from_numpy(targets.astype(np.int64)),
    )


# --------------------------------------------------------------------------- models


def derive_seed(seed: int, *parts: int) -> int:
    """A 31-bit seed for (run seed, fold, mode...): independent streams, reproducible."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] & 0x7FFFFFFF)


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch and ask for deterministic kernels (cheap on CPU), restoring the global flag after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def new_model(card: ModelCard, config: TrainConfig) -> HybridNet:
    """A fresh HybridNet (seed torch first); the encoder starts from `config.encoder_weights` if set.

    The file may hold the encoder's own state_dict or a whole HybridNet checkpoint (keys prefixed
    `image_encoder.`); it is read with weights_only=True, never unpickling code.
    """
    model = build_model(card)
    if config.encoder_weights is not None:
        try:
            state = torch.load(config.encoder_weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"encoder_weights {config.encoder_weights}: not a loadable state_dict ({exc})"
            ) from exc
        if not isinstance(state, dict):
            raise ValueError(
                f"encoder_weights {config.encoder_weights}: expected a state_dict (name -> tensor), "
                f"got {type(state).__name__}; save it with torch.save(module.state_dict(), path)"
            )
        prefix = "image_encoder."
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            model.image_encoder.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"encoder_weights {config.encoder_weights} do not fit encoder {config.encoder!r} "
                f"({str(exc).splitlines()[0]}); pass weights saved from the same encoder and channels"
            ) from exc
    return model


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


# --------------------------------------------------------------------------- cross-validation


@dataclass(eq=False)
class FoldResult:
    """One held-out fold: its patients, the scaler fitted without them, predictions per variant."""

    fold: int
    train_idx: np.ndarray
    test_idx: np.ndarray
    spec: TimelineSpec
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    histories: dict[str, tuple[EpochStats, ...]] = field(default_factory=dict)
    best_epochs: dict[str, int] = field(default_factory=dict)
    fusion_state: dict[str, torch.Tensor] | None = None

    def metrics(self, labels: np.ndarray, variant: str, threshold: float = 0.5) -> dict[str, float]:
        return binary_metrics(labels[self.test_idx], self.probs[variant], threshold)


@dataclass(eq=False)
class CVResult:
    """Every fold of one cross-validation run, with the config and base card it ran with."""

    config: TrainConfig
    card: ModelCard
    labels: np.ndarray
    folds: list[FoldResult]
    seconds: float
    images: np.ndarray
    """Network input of every patient (`network_images`), shared by the folds, the final fit and the report."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Decision threshold per variant where it is not the card's (calibrated variants: train/calibrate.py)."""
    calibration: Any = None
    """The run's `train/calibrate.CVCalibration` once `calibrate_cv` ran (Any: calibrate imports this module)."""

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.folds[0].probs) if self.folds else ()

    def fold_metrics(self, variant: str) -> list[dict[str, float]]:
        threshold = self.thresholds.get(variant, self.card.threshold)
        return [f.metrics(self.labels, variant, threshold) for f in self.folds]

    def pooled(self, variant: str) -> tuple[np.ndarray, np.ndarray]:
        """(truth, probability) over every held-out patient, for pooled ROC / calibration plots."""
        idx = np.concatenate([f.test_idx for f in self.folds])
        return self.labels[idx], np.concatenate([f.probs[variant] for f in self.folds])


def cross_validate(
    cohort: Cohort,
    card: ModelCard,
    config: TrainConfig,
    modes: Sequence[str] = ("fusion",),
    *,
    progress: bool = True,
) -> CVResult:
    """k-fold CV of the given branch modes; "fusion" also yields the no-EHR variant of the same model."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; use {', '.join(MODES)}")
    started = time.monotonic()
    folds = make_folds(cohort.labels, config.folds, config.seed)
    images = network_images(cohort, card)
    results = []
    with progress_bar(progress) as bar:
        for k, (train_idx, test_idx) in enumerate(folds, start=1):
            spec = fit_timeline_scaler(
                [cohort.events[i] for i in train_idx],
                [cohort.study_times[i] for i in train_idx],
                card.timeline,
            )
            fold_card = dataclasses.replace(card, timeline=spec)
            data = fit_data(cohort, fold_card, spec, images)
            fit_idx, val_idx = inner_split(
                cohort.labels, train_idx, config.val_fraction, derive_seed(config.seed, k)
            )
            result = FoldResult(k, train_idx, test_idx, spec)
            for mode in modes:
                task = bar.add_task(f"fold {k}/{config.folds} {mode:8s}", total=config.max_epochs, status="")

                def on_epoch(s: EpochStats, task: Any = task) -> None:
                    bar.update(task, advance=1, status=f"train {s.train_loss:.3f} val {s.val_loss:.3f}")

                seed = derive_seed(config.seed, k, MODES.index(mode))  # same seed whatever else runs
                with deterministic(seed):
                    model = new_model(fold_card, config)
                    outcome = fit(
                        model, data, fit_idx, val_idx, mode, config.fit_settings, seed=seed, on_epoch=on_epoch
                    )
                bar.update(task, completed=config.max_epochs, status=f"best epoch {outcome.best_epoch}")
                result.histories[mode], result.best_epochs[mode] = outcome.history, outcome.best_epoch
                result.probs[mode] = predict_positive(model, data, test_idx, mode, card.positive_index)
                if mode == "fusion":
                    result.probs[NO_EHR] = predict_positive(
                        model, data, test_idx, "image", card.positive_index
                    )
                    result.fusion_state = outcome.state
            results.append(result)
    return CVResult(config, card, cohort.labels, results, time.monotonic() - started, images)


__all__ = [
    "NO_EHR",
    "CVResult",
    "FoldResult",
    "cross_validate",
    "derive_seed",
    "deterministic",
    "encode_timelines",
    "fit_data",
    "fit_timeline_scaler",
    "inner_split",
    "make_folds",
    "network_images",
    "new_model",
    "progress_bar",
]
