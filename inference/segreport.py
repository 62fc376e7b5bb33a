"""Segmentation evaluation report: the architectures side by side (Dice, Jaccard, HD95 as mean ± sd over
folds), overlays of the best / median / worst held-out case of each, report.md + report.html + metrics.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from monai.transforms import Resize  # noqa: E402

from .document import Block, Bullets, Heading, Image, Paragraph, Table, to_html, to_markdown  # noqa: E402
from .metrics import format_mean_sd  # noqa: E402
from .segmetrics import METRICS  # noqa: E402
from .segtrain import SegCohort, SegCVResult  # noqa: E402

LABELS = {"dice": "Dice", "jaccard": "Jaccard", "hd95_mm": "HD95 (mm)"}


def _display_slice(array: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2D view of a case: volumes show the slice with the most truth."""
    if array.ndim == 2:
        return array, mask
    k = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1)))
    return array[k], mask[k]


def overlay_png(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, path: Path, *, title: str) -> Path:
    """The prepared image resized to the source grid, truth outline green, prediction outline red."""
    img = np.asarray(Resize(spatial_size=truth.shape, mode="bilinear" if truth.ndim == 2 else "trilinear")(
        np.asarray(image[:1], dtype=np.float32)))[0]
    img2, truth2 = _display_slice(img, truth)
    _, pred2 = _display_slice(img, prediction) if prediction.ndim == 2 else (None, prediction[
        int(np.argmax(truth.reshape(truth.shape[0], -1).sum(1)))])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(img2, cmap="gray")
    if truth2.any():
        ax.contour(truth2, levels=[0.5], colors="lime", linewidths=1.0)
    if pred2.any():
        ax.contour(pred2, levels=[0.5], colors="red", linewidths=1.0, linestyles="--")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ranked(result: SegCVResult) -> list[tuple[str, int, float]]:
    order = sorted(result.cases, key=lambda c: (c.metrics.dice, c.patient_id))
    picks = [("worst", order[0]), ("median", order[len(order) // 2]), ("best", order[-1])]
    return [(name, c.index, c.metrics.dice) for name, c in picks]


def summary_dict(result: SegCVResult) -> dict[str, object]:
    out: dict[str, object] = {
        "arch": result.arch, "folds": result.folds, "seed": result.seed, "features": list(result.features),
        "threshold": result.threshold, "seconds": round(result.seconds, 1), "best_epochs": result.best_epochs,
    }
    for m in METRICS:
        mean, sd = result.summary(m)
        out[f"{m}_mean"], out[f"{m}_sd"] = mean, sd
        out[f"{m}_per_fold"] = result.fold_means(m)
    out["cases_without_hd95"] = sum(1 for c in result.cases if not math.isfinite(c.metrics.hd95_mm))
    return out


def write_seg_report(results: Sequence[SegCVResult], cohort: SegCohort, out_dir: Path, *,
                     cohort_name: str) -> Path:
    """Write report.md, report.html, metrics.json and overlay PNGs to `out_dir`; returns report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = [summary_dict(r) for r in results]
    per_case = {r.arch: [{"patient_id": c.patient_id, "fold": c.fold, **c.metrics.as_dict()} for c in r.cases]
                for r in results}
    (out_dir / "metrics.json").write_text(json.dumps({"cohort": cohort_name, "patients": len(cohort),
                                                      "architectures": summaries, "cases": per_case},
                                                     indent=2, allow_nan=True), encoding="utf-8")
    r0 = results[0]
    blocks: list[Block] = [
        Heading(1, "Lesion segmentation: cross-validation report"),
        Paragraph(f"Cohort {cohort_name}: {len(cohort)} patients, {r0.folds}-fold cross-validation by patient "
                  f"(stratified by label, seed {r0.seed}). Network input {list(cohort.images.shape[1:])}; every "
                  "held-out prediction is mapped back to the source image grid and post-processed (largest "
                  "connected component, holes filled) before it is scored against the exact lesion mask. "
                  "Figures are the mean ± sd over folds of the per-fold mean; HD95 is the 95th-percentile "
                  "Hausdorff distance in mm (source pixel spacing)."),
        Table(("architecture", *(LABELS[m] for m in METRICS), "best epochs", "time (s)"),
              tuple((r.arch, *(format_mean_sd(r.summary(m), 3 if m != "hd95_mm" else 2) for m in METRICS),
                     ", ".join(str(e) for e in r.best_epochs), f"{r.seconds:.0f}") for r in results)),
        Bullets(tuple(f"{r.arch}: features {list(r.features)}, threshold {r.threshold}, "
                      f"{sum(1 for c in r.cases if not math.isfinite(c.metrics.hd95_mm))} case(s) without HD95 "
                      "(empty prediction)" for r in results)),
        Heading(2, "Best, median and worst held-out cases (by Dice)"),
        Paragraph("Green: truth; red dashed: prediction."),
    ]
    for r in results:
        for name, index, dice in _ranked(r):
            png = overlay_png(cohort.images[index], cohort.source_mask(index), r.predictions[index],
                              out_dir / f"overlay-{r.arch}-{name}.png",
                              title=f"{r.arch} {name}: {cohort.patient_ids[index]} Dice {dice:.3f}")
            blocks.append(Image(png.name, f"{r.arch} {name} case {cohort.patient_ids[index]}, Dice {dice:.3f}"))
    (out_dir / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(to_html(blocks, "Lesion segmentation report"), encoding="utf-8")
    return out_dir / "report.md"


__all__ = ["overlay_png", "summary_dict", "write_seg_report"]
