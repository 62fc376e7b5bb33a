"""The optimisation loop of one HybridNet: batches, augmentation, modality dropout, early stopping.

`train.py` decides *what* to fit (folds, scaler, which branches); this module only fits one model on
given index sets and predicts. Three branch modes share the network and the recipe so that the
comparison in the evaluation report is about the inputs, not about different code:

* "fusion": image + timeline; the timeline of a random `modality_dropout` share of training samples is
  removed (has_timeline = False) so that the image-only serving path stays meaningful.
* "image": the timeline is never given (the image-only CNN).
* "timeline": the image is replaced by a tiny blank image, so the CNN contributes a constant and the
  prediction comes from the LSTM alone (the timeline-only model).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Compose, RandFlip, RandRotate, RandScaleIntensity, RandZoom
from torch import nn

from dicom_fusion.inference.nets.hybrid import HybridNet, TimelineBatch

MODES = ("fusion", "image", "timeline")
BLANK_SIZE = 32
"""Side of the blank image of "timeline" mode: large enough for every MONAI encoder's downsampling."""
EVAL_BATCH = 128
AUGMENT_GROUP = 8
"""Images that share one draw of the augmentation parameters (see `_augment`)."""


@dataclass(frozen=True)
class FitSettings:
    """The optimisation knobs of one fit (a subset of TrainConfig, so this module does not parse TOML)."""

    batch_size: int
    learning_rate: float
    weight_decay: float
    max_epochs: int
    patience: int
    modality_dropout: float
    augment: bool
    freeze_encoder: bool = False


@dataclass(frozen=True, eq=False)
class FitData:
    """Inputs of every patient of the cohort as tensors; index sets select the patients of a fit."""

    images: torch.Tensor  # [N, C, *size] float32
    timelines: TimelineBatch  # [N, ...], encoded with the fold's fitted scaler
    targets: torch.Tensor  # [N] int64 class index


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float | None


@dataclass(frozen=True, eq=False)
class FitResult:
    """Best weights (lowest validation loss, or the last epoch without validation) and the curve."""

    state: dict[str, torch.Tensor]
    history: tuple[EpochStats, ...]
    best_epoch: int


def build_augmentation(spatial_dims: int, seed: int) -> Compose:
    """MONAI random transforms for training images: small rotation and zoom, left-right flip, intensity.

    Kept mild (±15°, ±10 %, ±10 % intensity) so a lesion's size and texture - the learnable signal -
    survive; only left-right flips, since anatomy is not upside-down symmetric.
    """
    transform = Compose(
        [
            RandRotate(range_x=math.radians(15), prob=0.5, keep_size=True, padding_mode="border"),
            RandZoom(min_zoom=0.9, max_zoom=1.1, prob=0.5, keep_size=True, padding_mode="edge"),
            RandFlip(prob=0.5, spatial_axis=spatial_dims - 1),
            RandScaleIntensity(factors=0.1, prob=0.5),
        ]
    )
    transform.set_random_state(seed=seed % (2**32))
    return transform


def class_weights(targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """n / (n_classes * count_c): each class contributes equally to the loss whatever its prevalence."""
    counts = torch.bincount(targets, minlength=n_classes).to(torch.float32)
    if (counts == 0).any():
        raise ValueError(
            f"a training split has no case of class(es) {torch.nonzero(counts == 0).flatten().tolist()}; "
            "use fewer folds or a larger cohort"
        )
    return counts.sum() / (n_classes * counts)


def _inputs(
    data: FitData,
    idx: np.ndarray,
    mode: str,
    *,
    train: bool,
    rng: np.random.Generator | None = None,
    settings: FitSettings | None = None,
    augment: Compose | None = None,
) -> tuple[torch.Tensor, ...]:
    index = torch.from_numpy(idx)
    tl = data.timelines
    has = tl.has_timeline[index].clone()
    if mode == "image":
        has[:] = False
    elif mode == "fusion" and train and rng is not None and settings is not None:
        has &= torch.from_numpy(rng.random(len(idx)) >= settings.modality_dropout)
    if mode == "timeline":
        shape = (len(idx), data.images.shape[1], *[BLANK_SIZE] * (data.images.dim() - 2))
        images = torch.zeros(shape, dtype=data.images.dtype)
    else:
        images = data.images[index]
        if augment is not None:
            images = _augment(images, augment)
    return images, tl.values[index], tl.mask[index], tl.deltas[index], tl.lengths[index], has


def _augment(images: torch.Tensor, augment: Compose) -> torch.Tensor:
    """Apply `augment` to groups of AUGMENT_GROUP images stacked along the channel axis.

    Each group shares one draw of the random parameters: per-image MONAI resampling cost ~5 ms, as much
    as the training step itself on 2 CPU cores; groups cut that by AUGMENT_GROUP while batches are
    reshuffled every epoch, so an image still meets a different draw each epoch.
    """
    out = []
    channels = images.shape[1]
    for group in torch.split(images, AUGMENT_GROUP):
        stacked = group.reshape(-1, *group.shape[2:])
        moved = torch.as_tensor(augment(stacked)).as_subclass(torch.Tensor)
        out.append(moved.reshape(len(group), channels, *moved.shape[1:]))
    return torch.cat(out).to(images.dtype)


def _batches(n: int, size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i : i + size] for i in range(0, n, size)]


def _mean_loss(model: HybridNet, data: FitData, idx: np.ndarray, mode: str, loss_fn: nn.Module) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for part in _batches(len(idx), EVAL_BATCH, None):
            sub = idx[part]
            logits = model(*_inputs(data, sub, mode, train=False))
            total += float(loss_fn(logits, data.targets[torch.from_numpy(sub)])) * len(sub)
    return total / max(1, len(idx))


def fit(
    model: HybridNet,
    data: FitData,
    train_idx: np.ndarray,
    val_idx: np.ndarray | None,
    mode: str,
    settings: FitSettings,
    *,
    seed: int,
    epochs: int | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FitResult:
    """Adam on class-weighted cross-entropy; early stopping on validation loss when `val_idx` is given.

    Without validation the model trains for exactly `epochs` (the final model, whose epoch count comes
    from cross-validation). The caller seeds torch; `seed` drives batch order, dropout and augmentation.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if val_idx is None and epochs is None:
        raise ValueError("without a validation split the number of epochs must be given")
    rng = np.random.default_rng(seed)
    n_classes = model.head[-1].out_features
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(data.targets[torch.from_numpy(train_idx)], n_classes))
    if settings.freeze_encoder:
        for p in model.image_encoder.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    spatial_dims = data.images.dim() - 2
    augment = build_augmentation(spatial_dims, seed) if settings.augment and mode != "timeline" else None

    def train_epoch() -> float:
        running, seen = 0.0, 0
        for part in _batches(len(train_idx), settings.batch_size, rng):
            sub = train_idx[part]
            inputs = _inputs(data, sub, mode, train=True, rng=rng, settings=settings, augment=augment)
            loss = loss_fn(model(*inputs), data.targets[torch.from_numpy(sub)])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            running += loss.item() * len(sub)
            seen += len(sub)
        return running / max(1, seen)

    validate = None if val_idx is None else (lambda: _mean_loss(model, data, val_idx, mode, loss_fn))
    return early_stopping(model, train_epoch, validate, max_epochs=epochs if epochs is not None else settings.max_epochs,
                          patience=settings.patience, on_epoch=on_epoch)


def early_stopping(
    model: nn.Module,
    train_epoch: Callable[[], float],
    validate: Callable[[], float] | None,
    *,
    max_epochs: int,
    patience: int,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FitResult:
    """The epoch loop of every network we train (classifier and segmenter): one place decides when to stop.

    ``train_epoch`` runs one pass over the training data and returns its mean loss; ``validate`` returns
    the validation loss. With validation, the weights of the lowest validation loss are kept (an
    improvement must exceed 1e-4) and training stops after ``patience`` epochs without one; without it
    (the final model, whose epoch count comes from cross-validation) every one of ``max_epochs`` runs and
    the last weights are kept. The model ends with the kept weights loaded.
    """
    history: list[EpochStats] = []
    best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(model.state_dict())
    for epoch in range(1, max_epochs + 1):
        model.train()
        train_loss = train_epoch()
        val_loss = validate() if validate is not None else None
        stats = EpochStats(epoch, train_loss, val_loss)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if val_loss is None:
            best_epoch, best_state = epoch, model.state_dict()
        elif val_loss < best_loss - 1e-4:
            best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            break
    state = {k: v.detach().clone().contiguous() for k, v in best_state.items()}
    model.load_state_dict(state)
    return FitResult(state=state, history=tuple(history), best_epoch=best_epoch)


def predict_positive(
    model: HybridNet, data: FitData, idx: np.ndarray, mode: str, positive_index: int
) -> np.ndarray:
    """Positive-class probabilities for `idx` in eval mode; mode "image" withholds every timeline."""
    model.eval()
    out = []
    with torch.no_grad():
        for part in _batches(len(idx), EVAL_BATCH, None):
            logits = model(*_inputs(data, idx[part], mode, train=False))
            out.append(torch.softmax(logits.float(), dim=1)[:, positive_index].numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float64)


__all__ = [
    "MODES",
    "EpochStats",
    "FitData",
    "FitResult",
    "FitSettings",
    "build_augmentation",
    "class_weights",
    "fit",
    "predict_positive",
]
