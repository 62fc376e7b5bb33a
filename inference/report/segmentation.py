"""Segmentation evaluation report: the architectures side by side (Dice, Jaccard, HD95 as mean ± sd over
folds), overlays of the best / median / worst held-out case of each, report.md + report.html + metrics.json.

Each cross-validation run saves its architecture's results in the report folder (`save_arch_result`), and
the report is assembled from every architecture saved there (`write_seg_report`), so architectures can be
evaluated in separate runs (one training at a time on a shared host) and still share one table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from monai.transforms import Resize

from dicom_fusion.inference.report.document import (
    Block,
    Bullets,
    Heading,
    Image,
    Paragraph,
    Table,
    to_html,
    to_markdown,
)
from dicom_fusion.inference.train.scores import format_mean_sd
from dicom_fusion.inference.train.seg_scores import METRICS
from dicom_fusion.inference.train.segmenter import SegCohort, SegCVResult

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
        "threshold": result.threshold, "max_epochs": result.max_epochs, "seconds": round(result.seconds, 1),
        "best_epochs": result.best_epochs,
    }
    for m in METRICS:
        mean, sd = result.summary(m)
        out[f"{m}_mean"], out[f"{m}_sd"] = mean, sd
        out[f"{m}_per_fold"] = result.fold_means(m)
    out["cases_without_hd95"] = sum(1 for c in result.cases if not math.isfinite(c.metrics.hd95_mm))
    return out


def save_arch_result(result: SegCVResult, cohort: SegCohort, out_dir: Path, *, cohort_name: str) -> Path:
    """`cv-<arch>.json` (summary, per-case metrics) and the arch's best / median / worst overlays in
    `out_dir`; `write_seg_report` assembles every architecture saved in the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overlays = []
    for name, index, dice in _ranked(result):
        png = overlay_png(cohort.images[index], cohort.source_mask(index), result.predictions[index],
                          out_dir / f"overlay-{result.arch}-{name}.png",
                          title=f"{result.arch} {name}: {cohort.patient_ids[index]} Dice {dice:.3f}")
        overlays.append({"file": png.name, "case": name, "patient_id": cohort.patient_ids[index], "dice": dice})
    data = {"cohort": cohort_name, "patients": len(cohort), "input": list(cohort.images.shape[1:]),
            "summary": summary_dict(result), "overlays": overlays,
            "cases": [{"patient_id": c.patient_id, "fold": c.fold, **c.metrics.as_dict()} for c in result.cases]}
    path = out_dir / f"cv-{result.arch}.json"
    path.write_text(json.dumps(data, indent=1, allow_nan=True), encoding="utf-8")
    return path


def _pair(summary: dict[str, object], metric: str) -> tuple[float, float]:
    return float(summary[f"{metric}_mean"]), float(summary[f"{metric}_sd"])  # type: ignore[arg-type]


def write_seg_report(out_dir: Path) -> Path:
    """report.md, report.html and metrics.json from every `cv-<arch>.json` in `out_dir`; returns report.md."""
    out_dir = Path(out_dir)
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out_dir.glob("cv-*.json"))]
    if not runs:
        raise ValueError(f"{out_dir} holds no cv-<arch>.json; run `dicom-fusion segment evaluate` first")
    runs.sort(key=lambda r: (r["summary"]["arch"] != "unet", r["summary"]["arch"]))
    first = runs[0]
    summaries = [r["summary"] for r in runs]
    (out_dir / "metrics.json").write_text(json.dumps(
        {"cohort": first["cohort"], "patients": first["patients"], "architectures": summaries}, indent=2,
        allow_nan=True), encoding="utf-8")
    blocks: list[Block] = [
        Heading(1, "Lesion segmentation: cross-validation report"),
        Paragraph(f"Cohort {first['cohort']}: {first['patients']} patients, {first['summary']['folds']}-fold "
                  f"cross-validation by patient (stratified by label, seed {first['summary']['seed']}). Network "
                  f"input {first['input']}; every held-out prediction is mapped back to the source image grid "
                  "and post-processed (largest connected component, holes filled) before it is scored against "
                  "the exact lesion mask. Figures are the mean ± sd over folds of the per-fold mean; HD95 is "
                  "the 95th-percentile Hausdorff distance in mm (source pixel spacing)."),
        Table(("architecture", *(LABELS[m] for m in METRICS), "max epochs", "best epochs", "time (s)"),
              tuple((s["arch"], *(format_mean_sd(_pair(s, m), 3 if m != "hd95_mm" else 2) for m in METRICS),
                     str(s["max_epochs"]), ", ".join(str(e) for e in s["best_epochs"]), f"{s['seconds']:.0f}")
                    for s in summaries)),
        Bullets(tuple(f"{s['arch']}: features {s['features']}, threshold {s['threshold']}, "
                      f"{s['cases_without_hd95']} case(s) without HD95 (empty prediction)" for s in summaries)),
        Heading(2, "Best, median and worst held-out cases (by Dice)"),
        Paragraph("Green: truth; red dashed: prediction."),
    ]
    for r in runs:
        for o in r["overlays"]:
            blocks.append(Image(o["file"], f"{r['summary']['arch']} {o['case']} case {o['patient_id']}, "
                                           f"Dice {o['dice']:.3f}"))
    (out_dir / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(to_html(blocks, "Lesion segmentation report"), encoding="utf-8")
    return out_dir / "report.md"


__all__ = ["overlay_png", "save_arch_result", "summary_dict", "write_seg_report"]
