"""PNG figures of the evaluation report (matplotlib, Agg backend: no display needed on a server).

Each function takes plain arrays and a path and returns the path, so the report writer decides what
to plot and these only decide how. One colour per model variant, the same in every figure.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_auc_score, roc_curve

from dicom_fusion.inference.train.fitloop import EpochStats
from dicom_fusion.inference.train.scores import reliability_curve

DPI = 110
COLOURS = {
    "fusion": "#1f77b4",
    "fusion_no_ehr": "#17becf",
    "image": "#ff7f0e",
    "timeline": "#2ca02c",
    "logistic_regression": "#7f7f7f",
    "gradient_boosting": "#9467bd",
    "fusion+calibrated": "#d62728",
    "fusion_no_ehr+calibrated": "#8c564b",
    "image+calibrated": "#e377c2",
    "timeline+calibrated": "#bcbd22",
}


NAMES = {
    "fusion": "fusion",
    "fusion_no_ehr": "fusion, EHR withheld",
    "image": "image-only CNN",
    "timeline": "timeline-only LSTM",
    "logistic_regression": "logistic regression",
    "gradient_boosting": "gradient boosting",
    "logistic_regression+lesion_area": "logistic regression + lesion area",
    "gradient_boosting+lesion_area": "gradient boosting + lesion area",
    "fusion+calibrated": "fusion, calibrated",
    "fusion_no_ehr+calibrated": "fusion, EHR withheld, calibrated",
    "image+calibrated": "image-only CNN, calibrated",
    "timeline+calibrated": "timeline-only LSTM, calibrated",
}
"""Short display names of the model variants, for legends and table headers."""


def _colour(name: str) -> str:
    return COLOURS.get(name, "#444444")


def display_name(name: str) -> str:
    return NAMES.get(name, name)


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def confusion_heatmap(matrix: np.ndarray, class_names: Sequence[str], path: Path, *, title: str) -> Path:
    """Counts and row percentages (share of each true class) in a 2x2 heatmap."""
    matrix = np.asarray(matrix)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.8, 4.0))
    shown = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), count in np.ndenumerate(matrix):
        colour = "white" if share[i, j] > 0.6 else "black"
        ax.text(j, i, f"{count}\n{share[i, j]:.0%}", ha="center", va="center", color=colour, fontsize=11)
    ax.set_xticks(range(len(class_names)), labels=class_names)
    ax.set_yticks(range(len(class_names)), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(textwrap.fill(title, 48), fontsize=9)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    return _save(fig, path)


def roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: Path,
    *,
    per_fold: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    title: str = "ROC curves (pooled held-out predictions)",
) -> Path:
    """One pooled ROC curve per variant ({name: (truth, prob)}); thin grey per-fold curves of the first."""
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    for y, p in per_fold:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, color="#bbbbbb", lw=0.8)
    for name, (y, p) in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(
            fpr,
            tpr,
            color=_colour(name),
            lw=1.8,
            label=f"{display_name(name)} (AUC {roc_auc_score(y, p):.3f})",
        )
    ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def learning_curves(histories: Mapping[str, Sequence[Sequence[EpochStats]]], path: Path) -> Path:
    """Training (dashed) and validation (solid) loss per epoch, one panel per mode, one line per fold."""
    modes = list(histories)
    fig, axes = plt.subplots(1, len(modes), figsize=(4.0 * len(modes), 3.4), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes, strict=True):
        for k, history in enumerate(histories[mode], start=1):
            epochs = [s.epoch for s in history]
            ax.plot(epochs, [s.train_loss for s in history], ls="--", color=_colour(mode), alpha=0.55, lw=1)
            val = [s.val_loss for s in history if s.val_loss is not None]
            if val:
                ax.plot(
                    epochs[: len(val)],
                    val,
                    color=_colour(mode),
                    lw=1.4,
                    label="validation" if k == 1 else None,
                )
        ax.plot([], [], ls="--", color=_colour(mode), alpha=0.55, label="training")
        ax.set_title(f"{display_name(mode)}: loss per epoch, each fold", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("class-weighted cross-entropy")
    return _save(fig, path)


def reliability_diagram(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    ece: Mapping[str, float],
    path: Path,
    n_bins: int = 10,
    *,
    title: str = "Reliability diagram (pooled held-out predictions)",
) -> Path:
    """Observed positive rate against mean predicted probability per bin; histogram of predictions below."""
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(5.2, 5.6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=0.8, label="perfect calibration")
    for name, (y, p) in curves.items():
        curve = reliability_curve(y, p, n_bins)
        used = curve.counts > 0
        ax.plot(
            curve.confidence[used],
            curve.frequency[used],
            marker="o",
            ms=3.5,
            color=_colour(name),
            label=f"{display_name(name)} (ECE {ece[name]:.3f})",
        )
        hist.hist(p, bins=curve.edges, histtype="step", color=_colour(name), lw=1.2)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed positive rate")
    ax.set_title(textwrap.fill(title, 56), fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    hist.set_xlabel("predicted probability of the positive class")
    hist.set_ylabel("cases")
    return _save(fig, path)


def attribution_bars(names: Sequence[str], mean_abs: Sequence[float], path: Path, *, title: str) -> Path:
    """Horizontal bars of mean |attribution| per timeline feature, largest on top."""
    order = np.argsort(mean_abs)
    fig, ax = plt.subplots(figsize=(5.2, 0.35 * len(names) + 1.2))
    ax.barh([names[i] for i in order], [mean_abs[i] for i in order], color=_colour("timeline"))
    ax.set_xlabel("mean |integrated gradients| (probability units)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


__all__ = [
    "COLOURS",
    "attribution_bars",
    "confusion_heatmap",
    "display_name",
    "learning_curves",
    "reliability_diagram",
    "roc_curves",
]
