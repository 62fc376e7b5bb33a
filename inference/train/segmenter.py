"""Training the lesion segmenter on a cohort folder: data, the fit loop, k-fold cross-validation by patient.

Data: `cohort.csv` rows (see `cohort.read_cohort_csv`) plus the `mask` column (default
`<patient>/mask.npy`, the exact lesion mask on the grid of the image the model reads). Images go through
the serving path (`transforms.select_series` / `decode_series` / `prepare_array`), masks are resized to
the network input as coverage fractions (`segment.mask_coverage`); both are cached under `DIR/.cache/`.

Fit: Adam on MONAI `DiceCELoss` with soft two-class targets (coverage, 1 - coverage), early stopping on
an inner validation split, the classifier's mild augmentation (rotation ±15°, zoom ±10 %, left-right
flip, intensity ±10 %) applied jointly to image and mask (dictionary transforms: one random draw for both
keys; the coverage is resampled linearly, so it stays a fraction).
Cross-validation scores every held-out case on its *source* grid (prediction mapped back and
post-processed, as the service does) against the exact mask.
"""

from __future__ import annotations

import csv
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.losses import DiceCELoss
from monai.transforms import Compose, RandFlipd, RandRotated, RandScaleIntensityd, RandZoomd
from rich.progress import track
from torch import nn

from dicom_fusion.inference.card.model import DEFAULT_INPUT, ImageSpec
from dicom_fusion.inference.data.cohort import CACHE_DIR, CohortError, read_cohort_csv
from dicom_fusion.inference.data.images import decode_series, prepare_array, read_headers, select_series
from dicom_fusion.inference.nets.segnet import DEFAULT_FEATURES, build_segnet
from dicom_fusion.inference.serve.segment import foreground_probability, mask_coverage, mask_from_probability
from dicom_fusion.inference.train.crossval import (
    derive_seed,
    deterministic,
    inner_split,
    make_folds,
    progress_bar,
)
from dicom_fusion.inference.train.fitloop import EpochStats, FitResult, early_stopping
from dicom_fusion.inference.train.seg_scores import CaseMetrics, case_metrics

SEG_CACHE_FORMAT = 2
AUGMENT_GROUP = 8
DEFAULT_SPEC_2D = ImageSpec(spatial_dims=2, size=(128, 128), channels=1, window=None, encoder="smallcnn")
DEFAULT_SPEC_3D = ImageSpec(spatial_dims=3, size=(32, 96, 96), channels=1, window=(-1000.0, 400.0),
                            encoder="smallcnn")


@dataclass(frozen=True, eq=False)
class SegCohort:
    """Images and masks of every patient, in cohort.csv order."""

    patient_ids: tuple[str, ...]
    labels: np.ndarray  # [N] 0/1, used to stratify folds
    images: np.ndarray  # [N, C, *size] float32, prepared like the classifier's input
    masks: np.ndarray  # [N, 1, *size] float32 lesion coverage of each network pixel (`segment.mask_coverage`)
    mask_paths: tuple[Path, ...]  # exact truth on the source grid
    spacing: np.ndarray  # [N, spatial_dims] mm per source pixel (slice, row, col for volumes)

    def __len__(self) -> int:
        return len(self.patient_ids)

    def source_mask(self, i: int) -> np.ndarray:
        return np.load(self.mask_paths[i], allow_pickle=False)


def _mask_column(cohort_dir: Path) -> dict[str, Path]:
    with open(cohort_dir / "cohort.csv", newline="", encoding="utf-8") as fh:
        return {row["patient_id"]: cohort_dir / (row.get("mask") or f"{row['patient_id']}/mask.npy")
                for row in csv.DictReader(fh)}


def _spacing(path: Path, spatial_dims: int) -> list[float]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    pair = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or [1.0, 1.0]
    inplane = [float(pair[0]), float(pair[1])]
    if spatial_dims == 2:
        return inplane
    through = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0
    return [float(through), *inplane]


def load_seg_cohort(cohort_dir: Path, spec: ImageSpec = DEFAULT_SPEC_2D, *, progress: bool = True) -> SegCohort:
    """Prepared images + resized masks of a cohort folder (cached per image spec and file stamps)."""
    cohort_dir = Path(cohort_dir)
    records = read_cohort_csv(cohort_dir)
    masks = _mask_column(cohort_dir)
    digest = hashlib.sha256(f"{SEG_CACHE_FORMAT}|{spec!r}".encode())
    for r in records:
        for f in sorted(r.study_dir.glob("*.dcm")) + [masks[r.patient_id]]:
            st = f.stat()
            digest.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    cache = cohort_dir / CACHE_DIR / f"seg-{digest.hexdigest()[:16]}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            images, small, spacing = z["images"], z["masks"], z["spacing"]
    else:
        images_l, masks_l, spacing_l = [], [], []
        for r in track(records, description="decoding cohort", disable=not progress, transient=True):
            path = masks[r.patient_id]
            if not path.is_file():
                raise CohortError(f"{path} does not exist; regenerate the cohort with `dicom-fusion synth` "
                                  "(it writes mask.npy) or add a mask column to cohort.csv")
            headers, _ = read_headers(sorted(r.study_dir.glob("*.dcm")))
            instances = select_series(headers, DEFAULT_INPUT)
            pixels, uids = decode_series(instances, spec)
            truth = np.load(path, allow_pickle=False)
            if truth.shape != pixels.shape[1:]:
                raise CohortError(f"{path}: mask shape {truth.shape} differs from the image {pixels.shape[1:]}")
            images_l.append(prepare_array(pixels, spec))
            masks_l.append(mask_coverage(truth, spec.size)[np.newaxis])
            chosen = next(h.path for h in instances if h.sop_instance_uid == uids[0])
            spacing_l.append(_spacing(chosen, spec.spatial_dims))
        images, small, spacing = np.stack(images_l), np.stack(masks_l), np.asarray(spacing_l, np.float64)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + ".tmp.npz")
        np.savez(tmp, images=images, masks=small, spacing=spacing)
        tmp.replace(cache)
    return SegCohort(
        patient_ids=tuple(r.patient_id for r in records),
        labels=np.asarray([r.label for r in records], dtype=np.int64),
        images=images.astype(np.float32), masks=small.astype(np.float32),
        mask_paths=tuple(masks[r.patient_id] for r in records), spacing=spacing,
    )


# --------------------------------------------------------------------------- fit


@dataclass(frozen=True)
class SegFitSettings:
    batch_size: int = 8
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    max_epochs: int = 20
    patience: int = 4
    val_fraction: float = 0.15
    augment: bool = True
    threads: int = 1
    """torch intra-op threads: on a shared 2-core host one thread is 2-10x faster than two."""


def build_joint_augmentation(spatial_dims: int, seed: int) -> Compose:
    """The classifier's augmentation (`fitloop.build_augmentation`) on keys image + label: one random draw
    moves both (the label, a coverage fraction, linearly); intensity only touches the image."""
    keys = ("image", "label")
    transform = Compose([
        RandRotated(keys=keys, range_x=math.radians(15), prob=0.5, keep_size=True,
                    mode=("bilinear", "bilinear"), padding_mode=("border", "border")),
        RandZoomd(keys=keys, min_zoom=0.9, max_zoom=1.1, prob=0.5, keep_size=True,
                  mode=("bilinear", "bilinear"), padding_mode=("edge", "edge")),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=spatial_dims - 1),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
    ])
    transform.set_random_state(seed=seed % (2**32))
    return transform


def _augment(images: torch.Tensor, masks: torch.Tensor, augment: Compose) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups of AUGMENT_GROUP cases share one draw (stacked along channels; see fitloop._augment)."""
    out_i, out_m = [], []
    c = images.shape[1]
    for gi, gm in zip(torch.split(images, AUGMENT_GROUP), torch.split(masks, AUGMENT_GROUP), strict=True):
        moved = augment({"image": gi.reshape(-1, *gi.shape[2:]), "label": gm.reshape(-1, *gm.shape[2:])})
        img = torch.as_tensor(moved["image"]).as_subclass(torch.Tensor)
        lab = torch.as_tensor(moved["label"]).as_subclass(torch.Tensor)
        out_i.append(img.reshape(len(gi), c, *img.shape[1:]))
        out_m.append(lab.reshape(len(gm), 1, *lab.shape[1:]))
    return torch.cat(out_i).float(), torch.cat(out_m).float().clamp(0.0, 1.0)


def _two_class(coverage: torch.Tensor) -> torch.Tensor:
    """[B, 1, ...] lesion fraction -> [B, 2, ...] soft target (background, lesion) for DiceCELoss."""
    return torch.cat([1.0 - coverage, coverage], dim=1)


def _val_loss(net: nn.Module, images: torch.Tensor, masks: torch.Tensor, idx: np.ndarray,
              loss_fn: nn.Module) -> float:
    net.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(idx), 32):
            sub = torch.from_numpy(idx[start:start + 32])
            total += float(loss_fn(net(images[sub]), _two_class(masks[sub]))) * len(sub)
    return total / max(1, len(idx))


def fit_segnet(net: nn.Module, cohort: SegCohort, train_idx: np.ndarray, val_idx: np.ndarray | None,
               settings: SegFitSettings, *, seed: int, epochs: int | None = None,
               on_epoch: Callable[[EpochStats], None] | None = None) -> FitResult:
    """Adam on Dice + cross-entropy; keeps the weights of the lowest validation loss (early stopping), or
    trains exactly `epochs` without validation (the final model). The caller seeds torch."""
    if val_idx is None and epochs is None:
        raise ValueError("without a validation split the number of epochs must be given")
    rng = np.random.default_rng(seed)
    torch.set_num_threads(settings.threads)
    images = torch.from_numpy(cohort.images)
    masks = torch.from_numpy(cohort.masks.astype(np.float32))
    loss_fn = DiceCELoss(to_onehot_y=False, softmax=True)
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    augment = build_joint_augmentation(images.dim() - 2, seed) if settings.augment else None

    def train_epoch() -> float:
        running, seen = 0.0, 0
        order = train_idx[rng.permutation(len(train_idx))]
        for start in range(0, len(order), settings.batch_size):
            sub = torch.from_numpy(order[start:start + settings.batch_size])
            x, y = images[sub], masks[sub]
            if augment is not None:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", category=UserWarning)
                    x, y = _augment(x, y, augment)
            loss = loss_fn(net(x), _two_class(y))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            running += loss.item() * len(sub)
            seen += len(sub)
        return running / max(1, seen)

    validate = None if val_idx is None else (lambda: _val_loss(net, images, masks, val_idx, loss_fn))
    return early_stopping(net, train_epoch, validate, max_epochs=epochs or settings.max_epochs,
                          patience=settings.patience, on_epoch=on_epoch)


# --------------------------------------------------------------------------- cross-validation


@dataclass(frozen=True)
class CaseResult:
    patient_id: str
    index: int
    fold: int
    metrics: CaseMetrics


@dataclass(eq=False)
class SegCVResult:
    """Held-out results of one architecture: per case, per fold, and the predicted source-grid masks."""

    arch: str
    folds: int
    seed: int
    features: tuple[int, ...]
    threshold: float
    max_epochs: int = 0
    cases: list[CaseResult] = field(default_factory=list)
    best_epochs: list[int] = field(default_factory=list)
    predictions: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    def fold_means(self, metric: str) -> list[float]:
        out = []
        for k in range(self.folds):
            vals = [getattr(c.metrics, metric) for c in self.cases if c.fold == k]
            vals = [v for v in vals if math.isfinite(v)]
            out.append(float(np.mean(vals)) if vals else math.nan)
        return out

    def summary(self, metric: str) -> tuple[float, float]:
        """Mean ± sd over folds of the per-fold mean (the figure the acceptance criteria name)."""
        vals = np.asarray([v for v in self.fold_means(metric) if math.isfinite(v)])
        if vals.size == 0:
            return math.nan, math.nan
        return float(vals.mean()), float(vals.std(ddof=1)) if vals.size > 1 else 0.0


def predict_cases(net: nn.Module, cohort: SegCohort, idx: Sequence[int], threshold: float,
                  roi_size: Sequence[int]) -> dict[int, np.ndarray]:
    """Post-processed source-grid masks of cases `idx`."""
    idx = list(idx)
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(idx), 32):
        part = idx[start:start + 32]
        prob = foreground_probability(net, cohort.images[part], roi_size)
        for i, p in zip(part, prob, strict=True):
            shape = np.load(cohort.mask_paths[i], mmap_mode="r").shape
            out[i] = mask_from_probability(p, shape, threshold)
    return out


def cross_validate_segmenter(cohort: SegCohort, *, arch: str = "unet", folds: int = 5, seed: int = 0,
                             settings: SegFitSettings = SegFitSettings(),
                             features: Sequence[int] = DEFAULT_FEATURES, threshold: float = 0.5,
                             progress: bool = True) -> SegCVResult:
    """k-fold by patient (stratified by label); every case scored once, on its source grid."""
    started = time.perf_counter()
    result = SegCVResult(arch=arch, folds=folds, seed=seed, features=tuple(features), threshold=threshold,
                         max_epochs=settings.max_epochs)
    spatial_dims = cohort.images.ndim - 2
    roi = cohort.images.shape[2:]
    with progress_bar(progress) as bar:
        for k, (train_idx, test_idx) in enumerate(make_folds(cohort.labels, folds, seed)):
            fit_idx, val_idx = inner_split(cohort.labels, train_idx, settings.val_fraction, derive_seed(seed, k))
            task = bar.add_task(f"{arch} fold {k + 1}/{folds}", total=settings.max_epochs, status="")

            def on_epoch(stats: EpochStats, task: int = task) -> None:
                bar.update(task, completed=stats.epoch, status=f"loss {stats.train_loss:.3f} val {stats.val_loss:.3f}")

            fold_seed = derive_seed(seed, k, 7)
            with deterministic(fold_seed):
                net = build_segnet(arch, spatial_dims, in_channels=cohort.images.shape[1], features=features)
                fit = fit_segnet(net, cohort, fit_idx, val_idx, settings, seed=fold_seed, on_epoch=on_epoch)
            bar.update(task, completed=settings.max_epochs, status=f"best epoch {fit.best_epoch}")
            result.best_epochs.append(fit.best_epoch)
            preds = predict_cases(net, cohort, test_idx, threshold, roi)
            for i in test_idx:
                m = case_metrics(preds[int(i)], cohort.source_mask(int(i)), cohort.spacing[int(i)])
                result.cases.append(CaseResult(cohort.patient_ids[int(i)], int(i), k, m))
            result.predictions.update(preds)
            dice = np.mean([c.metrics.dice for c in result.cases if c.fold == k])
            bar.console.print(f"{arch} fold {k + 1}/{folds}: Dice {dice:.3f}, best epoch {fit.best_epoch}, "
                              f"{time.perf_counter() - started:.0f} s")
    result.seconds = time.perf_counter() - started
    return result


def train_final(cohort: SegCohort, *, arch: str, epochs: int, seed: int, settings: SegFitSettings,
                features: Sequence[int] = DEFAULT_FEATURES) -> nn.Module:
    """The shipped model: every patient, `epochs` from cross-validation (median best epoch)."""
    final_seed = derive_seed(seed, 99)
    with deterministic(final_seed):
        net = build_segnet(arch, cohort.images.ndim - 2, in_channels=cohort.images.shape[1], features=features)
        fit_segnet(net, cohort, np.arange(len(cohort)), None, settings, seed=final_seed, epochs=epochs)
    return net.eval()


__all__ = [
    "DEFAULT_SPEC_2D",
    "DEFAULT_SPEC_3D",
    "CaseResult",
    "SegCVResult",
    "SegCohort",
    "SegFitSettings",
    "build_joint_augmentation",
    "cross_validate_segmenter",
    "fit_segnet",
    "load_seg_cohort",
    "predict_cases",
    "train_final",
]
