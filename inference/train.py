"""Training: stratified k-fold cross-validation by patient, then a final model on every patient.

Recipe (DESIGN "Method"): Adam, class-weighted cross-entropy, early stopping on the loss of an inner
validation split, MONAI augmentation on training images only, modality dropout for the fusion model.
No leakage: per fold, the timeline feature scaler (mean/std per feature, which also sets the value
imputed before a feature's first observation) is fitted on the training patients only, early stopping
looks at a split of the training patients, and the held-out fold is touched once, for its
predictions. Images are normalised per image (percentiles, `transforms.prepare_array`), so there is
nothing to fit for them.

The final model is fitted on all patients for the median early-stopping epoch of the folds, its
scaler on all patients; the card is written after the weights with the cross-validated metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.model_selection import StratifiedKFold, train_test_split

from .cohort import Cohort, load_cohort
from .fitloop import MODES, EpochStats, FitData, FitSettings, fit, predict_positive
from .metrics import binary_metrics, summarise
from .model import CARD_NAME, WEIGHTS_NAME, HybridNet, build_model, collate_timelines
from .modelcard import (
    DEFAULT_NAME,
    DEFAULT_VERSION,
    ENCODERS,
    ModelCard,
    TimelineSpec,
    default_card,
    sha256_file,
    write_card,
)
from .timeline import EventLike, TimelineTensor, encode_timeline

NO_EHR = "fusion_no_ehr"
"""Prediction variant: the fusion model with every timeline withheld (the service's image-only path)."""


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; every field is a key of the TOML file given to `dicom-fusion train --config`."""

    folds: int = 5
    max_epochs: int = 30
    patience: int = 6
    batch_size: int = 32
    learning_rate: float = 5e-4
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    modality_dropout: float = 0.25
    augment: bool = True
    seed: int = 0
    encoder: str = "smallcnn"
    encoder_weights: Path | None = None
    freeze_encoder: bool = False
    name: str = DEFAULT_NAME
    version: str = DEFAULT_VERSION

    def __post_init__(self) -> None:
        checks = [
            (self.folds >= 2, "folds must be at least 2"),
            (self.max_epochs >= 1 and self.patience >= 1, "max_epochs and patience must be at least 1"),
            (self.batch_size >= 2, "batch_size must be at least 2"),
            (
                self.learning_rate > 0 and self.weight_decay >= 0,
                "learning_rate must be > 0, weight_decay >= 0",
            ),
            (0 < self.val_fraction < 0.5, "val_fraction must be in (0, 0.5)"),
            (0 <= self.modality_dropout < 1, "modality_dropout must be in [0, 1)"),
            (self.encoder in ENCODERS, f"encoder must be one of {', '.join(ENCODERS)}"),
            (bool(self.name.strip()) and bool(self.version.strip()), "name and version must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"training config: {message}")
        if self.encoder_weights is not None:
            object.__setattr__(self, "encoder_weights", Path(self.encoder_weights))

    @property
    def fit_settings(self) -> FitSettings:
        return FitSettings(
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            max_epochs=self.max_epochs,
            patience=self.patience,
            modality_dropout=self.modality_dropout,
            augment=self.augment,
            freeze_encoder=self.freeze_encoder,
        )


def load_train_config(path: Path | None, **overrides: Any) -> TrainConfig:
    """TrainConfig from a TOML file (top-level keys = field names), then `overrides` that are not None.

    Unknown keys are errors, so a typo like `learning_rte` does not silently train with the default.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                values = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"training config {path}: cannot read it as TOML ({exc})") from exc
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"training config {path}: unknown key(s) {', '.join(unknown)}; "
                f"known keys: {', '.join(sorted(known))}"
            )
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise ValueError(f"training config: {exc}") from exc


def base_card(config: TrainConfig, out_dir: Path) -> ModelCard:
    """The default card with the config's name, version and encoder; weights not written yet."""
    out_dir = Path(out_dir).resolve()
    card = default_card(weights=out_dir / WEIGHTS_NAME, sha256="0" * 64, path=out_dir / CARD_NAME)
    image = dataclasses.replace(card.image, encoder=config.encoder)
    return dataclasses.replace(card, name=config.name, version=config.version, image=image)


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


def fit_data(cohort: Cohort, card: ModelCard, spec: TimelineSpec) -> FitData:
    """The cohort as tensors, its timelines encoded with `spec` (a fold's fitted scaler)."""
    targets = np.where(cohort.labels == 1, card.positive_index, 1 - card.positive_index)
    return FitData(
        images=torch.from_numpy(cohort.images),
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
    config: TrainConfig
    card: ModelCard
    labels: np.ndarray
    folds: list[FoldResult]
    seconds: float

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.folds[0].probs) if self.folds else ()

    def fold_metrics(self, variant: str) -> list[dict[str, float]]:
        return [f.metrics(self.labels, variant, self.card.threshold) for f in self.folds]

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
    results = []
    with progress_bar(progress) as bar:
        for k, (train_idx, test_idx) in enumerate(folds, start=1):
            spec = fit_timeline_scaler(
                [cohort.events[i] for i in train_idx],
                [cohort.study_times[i] for i in train_idx],
                card.timeline,
            )
            fold_card = dataclasses.replace(card, timeline=spec)
            data = fit_data(cohort, fold_card, spec)
            fit_idx, val_idx = inner_split(
                cohort.labels, train_idx, config.val_fraction, derive_seed(config.seed, k)
            )
            result = FoldResult(k, train_idx, test_idx, spec)
            for m, mode in enumerate(modes):
                task = bar.add_task(f"fold {k}/{config.folds} {mode:8s}", total=config.max_epochs, status="")

                def on_epoch(s: EpochStats, task: Any = task) -> None:
                    bar.update(task, advance=1, status=f"train {s.train_loss:.3f} val {s.val_loss:.3f}")

                seed = derive_seed(config.seed, k, m)
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
    return CVResult(config, card, cohort.labels, results, time.monotonic() - started)


def card_metrics(cv: CVResult, final_epochs: int) -> dict[str, float]:
    """`cv_<metric>_mean` / `_sd` of the fusion model (and its no-EHR path) plus cohort facts."""
    out: dict[str, float] = {}
    for variant, prefix in (("fusion", "cv"), (NO_EHR, "cv_no_ehr")):
        if variant in cv.variants:
            for name, (mean, sd) in summarise(cv.fold_metrics(variant)).items():
                if math.isfinite(mean):
                    out[f"{prefix}_{name}_mean"], out[f"{prefix}_{name}_sd"] = round(mean, 4), round(sd, 4)
    out.update(
        cv_folds=float(cv.config.folds),
        n_patients=float(cv.labels.size),
        prevalence=round(float(cv.labels.mean()), 4),
        final_epochs=float(final_epochs),
        seed=float(cv.config.seed),
    )
    return out


# --------------------------------------------------------------------------- final model


def save_model(model: HybridNet, card: ModelCard, metrics: dict[str, float]) -> ModelCard:
    """Write the weights (temp file, fsync, rename), then the card naming their sha256: never a card
    that points at missing or other weights."""
    out_dir = card.weights.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".weights-", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, card.weights)
    final = dataclasses.replace(card, sha256=sha256_file(card.weights), metrics=metrics)
    write_card(final, card.path)
    return final


@dataclass(eq=False)
class TrainResult:
    card: ModelCard
    cv: CVResult
    cohort: Cohort
    final_history: tuple[EpochStats, ...]
    seconds: float


def train_model(
    cohort_dir: Path,
    out_dir: Path,
    config: TrainConfig,
    *,
    modes: Sequence[str] = ("fusion",),
    progress: bool = True,
    cohort: Cohort | None = None,
) -> TrainResult:
    """Cross-validate, train the final fusion model on every patient, write weights + card + training.json."""
    started = time.monotonic()
    card = base_card(config, out_dir)
    cohort = cohort if cohort is not None else load_cohort(cohort_dir, card, progress=progress)
    modes = ("fusion", *[m for m in modes if m != "fusion"])
    cv = cross_validate(cohort, card, config, modes, progress=progress)
    epochs = max(1, int(np.median([f.best_epochs["fusion"] for f in cv.folds])))
    spec = fit_timeline_scaler(cohort.events, cohort.study_times, card.timeline)
    final_card = dataclasses.replace(card, timeline=spec)
    data = fit_data(cohort, final_card, spec)
    seed = derive_seed(config.seed, 0)
    with progress_bar(progress) as bar, deterministic(seed):
        task = bar.add_task("final model (all patients)", total=epochs, status="")
        model = new_model(final_card, config)
        outcome = fit(
            model,
            data,
            np.arange(len(cohort)),
            None,
            "fusion",
            config.fit_settings,
            seed=seed,
            epochs=epochs,
            on_epoch=lambda s: bar.update(task, advance=1, status=f"train {s.train_loss:.3f}"),
        )
    saved = save_model(model, final_card, card_metrics(cv, epochs))
    seconds = time.monotonic() - started
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()},
        "cohort": str(cohort_dir),
        "seconds": round(seconds, 1),
        "cv_seconds": round(cv.seconds, 1),
        "folds": [
            {
                "fold": f.fold,
                "best_epochs": f.best_epochs,
                "metrics": {v: f.metrics(cv.labels, v, card.threshold) for v in cv.variants},
            }
            for f in cv.folds
        ],
        "final_history": [dataclasses.asdict(s) for s in outcome.history],
    }
    (saved.path.parent / "training.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return TrainResult(saved, cv, cohort, outcome.history, seconds)


__all__ = [
    "NO_EHR",
    "CVResult",
    "FoldResult",
    "TrainConfig",
    "TrainResult",
    "base_card",
    "card_metrics",
    "cross_validate",
    "derive_seed",
    "encode_timelines",
    "fit_data",
    "fit_timeline_scaler",
    "inner_split",
    "load_train_config",
    "make_folds",
    "new_model",
    "save_model",
    "train_model",
]
