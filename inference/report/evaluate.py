"""k-fold evaluation report: fusion vs its single branches vs traditional baselines, with explanations.

`evaluate_cohort` cross-validates the three branch modes of HybridNet (fusion, image-only CNN,
timeline-only LSTM; see fitloop.py) and two scikit-learn baselines on the same folds, then writes
`report.md`, `report.html`, `metrics.json` and PNG figures to one folder. `evaluate_cv` does the same
from an existing CVResult, which is how `dicom-fusion train --report` avoids training twice.

Explanations are computed with the fusion model of fold 1 on its held-out patients: Grad-CAM mass
inside the planted lesion (synthetic cohorts record it in cohort.csv) and integrated-gradients
attributions per timeline feature.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicom_fusion.inference.data.cohort import BundleEventReader, Cohort, load_cohort
from dicom_fusion.inference.nets.hybrid import build_model
from dicom_fusion.inference.report.baselines import (
    BASELINES,
    WITH_LESION_AREA,
    baseline_probs,
    lesion_area,
    tabular_features,
)
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
from dicom_fusion.inference.report.plots import (
    attribution_bars,
    confusion_heatmap,
    display_name,
    learning_curves,
    reliability_diagram,
    roc_curves,
)
from dicom_fusion.inference.serve.explain import explain, save_overlay
from dicom_fusion.inference.train.calibrate import (
    AUC_TOLERANCE,
    CALIBRATED,
    CVCalibration,
    calibrate_cv,
)
from dicom_fusion.inference.train.config import TrainConfig, base_card
from dicom_fusion.inference.train.crossval import (
    NO_EHR,
    CVResult,
    cross_validate,
    derive_seed,
    encode_timelines,
)
from dicom_fusion.inference.train.fitloop import MODES
from dicom_fusion.inference.train.scores import (
    METRIC_NAMES,
    bootstrap_auc_ci,
    confusion,
    expected_calibration_error,
    format_mean_sd,
    mean_sd,
)

LABELS = {
    "fusion": "Fusion CNN+LSTM (image + EHR)",
    NO_EHR: "same fusion model, EHR withheld",
    "image": "Image-only CNN",
    "timeline": "Timeline-only LSTM",
    "logistic_regression": "Logistic regression (tabular)",
    "gradient_boosting": "Gradient boosting (tabular)",
    "logistic_regression" + WITH_LESION_AREA: "Logistic regression (tabular + segmenter lesion area)",
    "gradient_boosting" + WITH_LESION_AREA: "Gradient boosting (tabular + segmenter lesion area)",
    "fusion" + CALIBRATED: "Fusion CNN+LSTM, calibrated (shipped decision)",
    NO_EHR + CALIBRATED: "same fusion model, EHR withheld, calibrated",
    "image" + CALIBRATED: "Image-only CNN, calibrated",
    "timeline" + CALIBRATED: "Timeline-only LSTM, calibrated",
}
LESION_MARGIN = 1.5
"""The lesion region for Grad-CAM mass is a disc of this many mean radii (the border is irregular)."""


@dataclass(frozen=True)
class ExplanationSummary:
    n_patients: int
    lesion_mass: tuple[float, float] | None  # mean, sd of Grad-CAM share inside the lesion region
    lesion_area: float | None  # mean share of the image the region covers (chance level)
    peak_inside: float | None  # share of patients whose Grad-CAM maximum lies in the region
    feature_importance: dict[str, float]  # mean |IG| per timeline feature
    examples: tuple[Path, ...]


@dataclass(frozen=True)
class EvaluationResult:
    out_dir: Path
    report: Path
    summary: dict[str, dict[str, tuple[float, float]]]  # variant -> metric -> (mean, sd)
    explanations: ExplanationSummary
    seconds: float


def add_baselines(cohort: Cohort, cv: CVResult) -> None:
    """Fit each sklearn baseline on each fold's training patients; store held-out probabilities.

    With a lesion channel each baseline runs a second time with one more column, the segmenter's lesion
    area: what the guided network gets from the segmenter, handed to the tabular model as a number, so
    the report separates the gain of segmentation from the gain of learning the fusion.
    """
    features = tabular_features(cohort.images, cohort.events, cohort.study_times, cv.card.timeline)
    sets = {"": features}
    if cv.card.image.lesion_channel:
        sets[WITH_LESION_AREA] = np.column_stack([features, lesion_area(cv.images)])
    for fold in cv.folds:
        for b, name in enumerate(BASELINES):
            seed = derive_seed(cv.config.seed, fold.fold, 100 + b)
            for suffix, columns in sets.items():
                fold.probs[name + suffix] = baseline_probs(
                    columns, cohort.labels, fold.train_idx, fold.test_idx, name, seed
                )


def read_lesions(cohort_dir: Path | None) -> dict[str, tuple[float, float, float]]:
    """Planted lesion (row, col, radius as image fractions) per patient, when cohort.csv records it."""
    path = Path(cohort_dir) / "cohort.csv" if cohort_dir is not None else None
    if path is None or not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "lesion_radius" not in rows[0]:
        return {}
    return {
        r["patient_id"]: (float(r["lesion_row"]), float(r["lesion_col"]), float(r["lesion_radius"]))
        for r in rows
    }


def lesion_mass(saliency: np.ndarray, lesion: tuple[float, float, float]) -> tuple[float, float, bool]:
    """(share of saliency inside the lesion region, share of image area it covers, peak inside?).

    A volume's map [slices, rows, cols] is summed over its slices first and its peak taken in 3D: the
    cohort records the lesion's row, column and radius only, so the region is the disc's column through
    every slice (in-plane localisation).
    """
    rows, cols = saliency.shape[-2:]
    peak = np.unravel_index(int(np.argmax(saliency)), saliency.shape)[-2:]
    saliency = np.asarray(saliency).reshape(-1, rows, cols).sum(axis=0)
    yy, xx = np.mgrid[0:rows, 0:cols]
    centre_r, centre_c, radius = (
        lesion[0] * (rows - 1),
        lesion[1] * (cols - 1),
        lesion[2] * cols * LESION_MARGIN,
    )
    inside = (yy - centre_r) ** 2 + (xx - centre_c) ** 2 <= radius**2
    total = float(saliency.sum())
    share = float(saliency[inside].sum() / total) if total > 0 else math.nan
    return share, float(inside.mean()), bool(inside[peak])


def explain_fold(
    cohort: Cohort,
    cv: CVResult,
    out_dir: Path,
    lesions: dict[str, tuple[float, float, float]],
    n_examples: int = 4,
) -> ExplanationSummary:
    """Grad-CAM + IG for every held-out patient of fold 1 with that fold's fusion model."""
    fold = cv.folds[0]
    if fold.fusion_state is None:
        return ExplanationSummary(0, None, None, None, {}, ())
    card = dataclasses.replace(cv.card, timeline=fold.spec)
    model = build_model(card)
    model.load_state_dict(fold.fusion_state)
    model.eval()
    idx = fold.test_idx
    inputs = cv.images[idx]
    timelines = encode_timelines(
        [cohort.events[i] for i in idx], [cohort.study_times[i] for i in idx], fold.spec
    )
    shares, areas, peaks, importance, explained = [], [], [], [], []
    for i, x, tl in zip(idx, inputs, timelines, strict=True):
        exp = explain(model, card, x, tl)
        explained.append((i, exp))
        lesion = lesions.get(cohort.records[i].patient_id)
        if lesion is not None:
            share, area, peak = lesion_mass(exp.saliency, lesion)
            shares.append(share)
            areas.append(area)
            peaks.append(peak)
        if exp.attributions:
            importance.append([abs(a.attribution) for a in exp.attributions])
    names = [f.name for f in card.timeline.features]
    mean_abs = np.mean(importance, axis=0) if importance else np.zeros(len(names))
    # Examples: the most confident positives and negatives among correctly and wrongly classified cases.
    ranked = sorted(explained, key=lambda t: -t[1].probability)
    picks = ranked[: max(1, n_examples - 1)] + ranked[-1:]
    examples = []
    for i, exp in picks:
        rec = cohort.records[i]
        top = ", ".join(f"{a.name} {a.attribution:+.3f}" for a in exp.top_features(3)) or "no timeline"
        examples.append(
            save_overlay(
                cohort.images[i],
                exp.saliency,
                out_dir / f"gradcam_{rec.patient_id}.png",
                title=f"{rec.patient_id} label {rec.label} p={exp.probability:.2f} | {top}",
                mark=lesions.get(rec.patient_id),
            )
        )
    return ExplanationSummary(
        n_patients=len(idx),
        lesion_mass=mean_sd(shares) if shares else None,
        lesion_area=float(np.mean(areas)) if areas else None,
        peak_inside=float(np.mean(peaks)) if peaks else None,
        feature_importance=dict(zip(names, (float(v) for v in mean_abs), strict=True)),
        examples=tuple(examples),
    )


def _paired_gap(cv: CVResult, a: str, b: str) -> tuple[float, float]:
    per_fold = [
        cv.fold_metrics(a)[k]["roc_auc"] - cv.fold_metrics(b)[k]["roc_auc"] for k in range(len(cv.folds))
    ]
    return mean_sd(per_fold)


def _ci(pair: tuple[float, float]) -> str:
    return "n/a" if math.isnan(pair[0]) else f"{pair[0]:.3f}–{pair[1]:.3f}"


def _calibration_blocks(cal: CVCalibration, figures: dict[str, str]) -> list[Block]:
    """The "Calibration" section: the choice per variant, before/after, the threshold, the band."""
    fusion = cal.choices["fusion"]
    rows = tuple(
        (
            LABELS.get(v, v), c.calibrator.method,
            f"{c.raw.ece:.3f} → {c.chosen.ece:.3f}", f"{c.raw.brier:.3f} → {c.chosen.brier:.3f}",
            f"{c.raw.roc_auc:.3f} → {c.chosen.roc_auc:.3f}",
        )
        for v, c in cal.choices.items()
    )
    spec = cal.spec
    target = (f"the highest calibrated probability that keeps sensitivity ≥ {spec.target_sensitivity:.0%} on "
              "the out-of-fold predictions" if spec.target_sensitivity is not None else "fixed")
    band = (f"Indeterminate band [{spec.indeterminate[0]:.3f}, {spec.indeterminate[1]:.3f}] around it: "
            f"{cal.band_share:.1%} of the out-of-fold patients fall in it and are reported \"indeterminate\"."
            if spec.indeterminate is not None and cal.band_share is not None else "No indeterminate band.")
    return [
        Heading(2, "Calibration"),
        Paragraph(
            "Post-hoc calibration of each network's positive-class probability, fitted on the out-of-fold "
            "predictions of the cross-validation (train/calibrate.py). Candidates: identity, temperature "
            "scaling, Platt scaling, isotonic regression. Selection by cross-validated ECE with the CV folds "
            "as the split of the out-of-fold set: each fold's predictions are calibrated by a calibrator "
            "fitted on the other folds' predictions, and the lowest pooled ECE wins among methods that keep "
            f"the mean per-fold ROC-AUC within {AUC_TOLERANCE}; the winner is refitted on every out-of-fold "
            "prediction for the card. Before → after below: ECE and Brier score pooled over all held-out "
            "patients, ROC-AUC the mean over folds; the after figures are cross-fitted (patients the "
            "calibrator did not see); ECE on 10 equal-width bins."
        ),
        Table(("model", "method", "ECE", "Brier score", "ROC-AUC"), rows),
        Paragraph("Fusion model, every candidate (cross-fitted, pooled):"),
        Table(("method", "ECE", "Brier score", "ROC-AUC"),
              tuple((m.method, f"{m.ece:.3f}", f"{m.brier:.3f}", f"{m.roc_auc:.3f}") for m in fusion.scores)),
        Paragraph(
            f"Shipped calibrator: {spec.describe()} for the fusion model; "
            f"{(spec.no_ehr or spec).describe()} for its image-only path (EHR withheld). Decision threshold "
            f"{cal.threshold:.4f} on the calibrated probability, chosen as {target}: sensitivity "
            f"{cal.sensitivity:.1%}, specificity {cal.specificity:.1%} there. {band}"
        ),
        *(Image(path, alt) for alt, path in figures.items()),
    ]


def _blocks(
    cohort: Cohort,
    cv: CVResult,
    summary: dict[str, dict[str, tuple[float, float]]],
    exp: ExplanationSummary,
    figures: dict[str, str],
    source: str,
    cis: dict[str, tuple[float, float]],
    calibration_figures: dict[str, str],
) -> list[Block]:
    k = len(cv.folds)
    c = cv.config
    seg = cv.card.segmenter
    guided: tuple[str, ...] = ()
    if cv.card.image.lesion_channel and seg is not None:
        note = (
            "Segmentation-guided: the image branch reads the prepared image plus, as a second channel, "
            f"the lesion probability map of segmenter {seg.parent.name}/{seg.name} (serve/lesion_channel.py)."
        )
        guided = (note,)
    blocks: list[Block] = [
        Heading(1, "Evaluation report"),
        Paragraph(
            f"Cohort {source}: {len(cohort)} patients, {int(cohort.labels.sum())} positive "
            f"({cohort.labels.mean():.0%}). Stratified {k}-fold cross-validation by patient, seed {c.seed}; "
            f"every number is a held-out fold, mean ± sd over the {k} folds; the 95 % CI of the ROC-AUC is a "
            "percentile bootstrap (2000 resamples of patients) of the pooled held-out predictions. "
            f"Threshold {cv.card.threshold} for the uncalibrated rows, "
            + (f"{cv.calibration.threshold:.4f} (chosen, see Calibration) for the calibrated ones."
               if cv.calibration is not None else "no calibrated rows.")
        ),
        Heading(2, "Comparison"),
        Table(
            ("model", "ROC-AUC", "ROC-AUC 95 % CI", "accuracy", "precision", "recall", "F1", "ECE", "Brier"),
            tuple(
                (
                    LABELS.get(v, v),
                    format_mean_sd(summary[v]["roc_auc"]),
                    _ci(cis[v]),
                    *(format_mean_sd(summary[v][m]) for m in (*METRIC_NAMES[:4], "ece", "brier")),
                )
                for v in summary
            ),
        ),
    ]
    gaps = [
        f"fusion − {display_name(o)}: {format_mean_sd(_paired_gap(cv, 'fusion', o))}"
        for o in summary
        if o != "fusion" and "fusion" in summary and not o.endswith(CALIBRATED)
    ]
    if gaps:
        blocks += [Paragraph("ROC-AUC gain of fusion, paired by fold:"), Bullets(tuple(gaps))]
    blocks += [
        Heading(2, "ROC-AUC per fold"),
        Table(
            ("fold", *(display_name(v) for v in summary)),
            tuple(
                (str(f.fold), *(f"{cv.fold_metrics(v)[i]['roc_auc']:.3f}" for v in summary))
                for i, f in enumerate(cv.folds)
            ),
        ),
        Heading(2, "Figures"),
        *(Image(path, alt) for alt, path in figures.items()),
    ]
    if isinstance(cv.calibration, CVCalibration):
        blocks += _calibration_blocks(cv.calibration, calibration_figures)
    blocks += [
        Heading(2, "Explanations"),
    ]
    if exp.lesion_mass is not None:
        region = "disc" if cv.card.image.spatial_dims == 2 else "column through every slice of a disc"
        blocks.append(
            Paragraph(
                f"Grad-CAM of the fold-1 fusion model on its {exp.n_patients} held-out patients: "
                f"{format_mean_sd(exp.lesion_mass)} of the saliency mass lies inside the planted "
                f"lesion ({region} of {LESION_MARGIN}× its mean radius), which covers {exp.lesion_area:.1%} "
                f"of the image on average (chance level); the saliency peak is inside it for "
                f"{exp.peak_inside:.0%} of patients."
            )
        )
    if exp.feature_importance:
        ranked = sorted(exp.feature_importance.items(), key=lambda kv: -kv[1])
        blocks += [
            Paragraph(
                "Integrated gradients on the timeline values (baseline: every value at its training "
                "mean), mean |attribution| over held-out patients with a timeline:"
            ),
            Table(
                ("rank", "feature", "mean abs(IG)"),
                tuple((str(r), n, f"{v:.4f}") for r, (n, v) in enumerate(ranked, start=1)),
            ),
        ]
    blocks += [Image(p.name, f"Grad-CAM example {p.stem.removeprefix('gradcam_')}") for p in exp.examples]
    blocks += [
        Heading(2, "Method"),
        Bullets(
            (
                (
                    f"Same network and recipe for every neural variant: HybridNet (MONAI "
                    f"{cv.card.image.encoder} image encoder, LSTM over {cv.card.timeline.n_bins} bins of "
                    f"{cv.card.timeline.bin_days} days, FC fusion head); image-only = timeline always "
                    "withheld; timeline-only = image replaced by a blank input."
                ),
                (
                    f"Adam (lr {c.learning_rate}, weight decay {c.weight_decay}), class-weighted "
                    f"cross-entropy, batch {c.batch_size}, at most {c.max_epochs} epochs, early stopping "
                    f"(patience {c.patience}) on an inner {c.val_fraction:.0%} validation split of the "
                    "training folds."
                ),
                (
                    "Training only: MONAI RandRotate ±15°, RandZoom 0.9–1.1, RandFlip (left-right), "
                    f"RandScaleIntensity ±10 % (augment={c.augment}); modality dropout "
                    f"{c.modality_dropout:.0%} of fusion training samples."
                ),
                (
                    "No leakage: timeline feature mean/std (scaling and the imputed value) fitted on each "
                    "fold's training patients only; baselines impute/scale inside an sklearn pipeline "
                    "fitted per fold."
                ),
                "Baselines: per-lab last/mean/slope/count, event counts, image intensity statistics"
                + ("; '+ lesion area' adds the segmenter's lesion area as one more column." if guided else "."),
                *guided,
                f"Cross-validation took {cv.seconds:.0f} s.",
            )
        ),
    ]
    return blocks


def evaluate_cv(
    cohort: Cohort, cv: CVResult, out_dir: Path, *, cohort_dir: Path | None = None,
    config: TrainConfig | None = None,
) -> EvaluationResult:
    """Add baselines to `cv`, calibrate it (unless `train` did; `config` default: the run's), compute
    metrics, draw figures, explain fold 1, write the report files."""
    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    add_baselines(cohort, cv)
    calibration = calibrate_cv(cv, config if config is not None else cv.config)
    baselines = (*BASELINES, *(b + WITH_LESION_AREA for b in BASELINES))
    networks = ("fusion", "fusion" + CALIBRATED, NO_EHR, NO_EHR + CALIBRATED, "image", "image" + CALIBRATED,
                "timeline", "timeline" + CALIBRATED)
    order = [v for v in (*networks, *baselines) if v in cv.variants]
    per_fold = {v: cv.fold_metrics(v) for v in order}
    summary = {v: {m: mean_sd([f[m] for f in per_fold[v]]) for m in METRIC_NAMES} for v in order}
    pooled = {v: cv.pooled(v) for v in order}
    cis = {v: bootstrap_auc_ci(*pooled[v], seed=cv.config.seed) for v in order}
    names = list(cv.card.class_names)
    if cv.card.positive_index == 0:
        names = names[::-1]  # rows/columns of `confusion` are (negative, positive)
    figures = {
        "ROC curves": roc_curves(
            pooled,
            out_dir / "roc.png",
            per_fold=[(cv.labels[f.test_idx], f.probs[order[0]]) for f in cv.folds],
        ),
        "Confusion matrix": confusion_heatmap(
            confusion(*pooled[order[0]], cv.card.threshold),
            names,
            out_dir / "confusion.png",
            title=f"{LABELS.get(order[0], order[0])}: pooled held-out, threshold {cv.card.threshold}",
        ),
        "Reliability diagram (uncalibrated)": reliability_diagram(
            {v: pooled[v] for v in order if v in ("fusion", "image", "timeline", "logistic_regression")},
            {v: expected_calibration_error(*pooled[v]) for v in order},
            out_dir / "calibration.png",
        ),
        "Learning curves": learning_curves(
            {m: [f.histories[m] for f in cv.folds] for m in MODES if m in cv.folds[0].histories},
            out_dir / "learning_curves.png",
        ),
    }
    explanation = explain_fold(cohort, cv, out_dir, read_lesions(cohort_dir))
    if explanation.feature_importance:
        imp = explanation.feature_importance
        figures["Timeline attributions"] = attribution_bars(
            list(imp),
            list(imp.values()),
            out_dir / "timeline_attributions.png",
            title="Timeline attributions (integrated gradients), fold 1",
        )
    ece = {v: expected_calibration_error(*pooled[v]) for v in order}
    calibration_figures = {
        f"Reliability diagram, {display_name(model)}: before and after calibration": reliability_diagram(
            {v: pooled[v] for v in variants if v in pooled}, ece, out_dir / f"calibration_{model}.png",
            title=f"{display_name(model)}: before / after calibration (pooled held-out)",
        )
        for model, variants in (
            ("fusion", ("fusion", "fusion" + CALIBRATED)),
            ("image", ("image", "image" + CALIBRATED, NO_EHR, NO_EHR + CALIBRATED)),
        )
        if model in pooled
    }
    rel = {alt: p.name for alt, p in figures.items()}
    blocks = _blocks(cohort, cv, summary, explanation, rel, str(cohort_dir or "(in memory)"), cis,
                     {alt: p.name for alt, p in calibration_figures.items()})
    if (out_dir / "ensemble.md").is_file():  # `dicom-fusion model compare` wrote its decision beside this report
        at = next(i for i, b in enumerate(blocks) if isinstance(b, Heading) and b.text == "Explanations")
        blocks[at:at] = [Heading(2, "Single network or fold ensemble"), Paragraph(
            "Measured on a fresh cohort none of the networks saw (`dicom-fusion model compare`, `make ensemble`): "
            "ROC-AUC and ECE with 95 % intervals, time per study, the decision and the members-disagree limit are "
            "in [ensemble.md](ensemble.md).")]
    report = out_dir / "report.md"
    report.write_text(to_markdown(blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(to_html(blocks, "dicom-fusion evaluation report"), encoding="utf-8")
    metrics = {
        "per_fold": per_fold,
        "summary": {v: {m: list(s) for m, s in ms.items()} for v, ms in summary.items()},
        "explanations": {
            **dataclasses.asdict(explanation),
            "examples": [p.name for p in explanation.examples],
        },
        "roc_auc_ci95": {v: list(ci) for v, ci in cis.items()},
        "calibration": {
            "threshold": calibration.threshold,
            "target_sensitivity": calibration.spec.target_sensitivity,
            "indeterminate": list(calibration.spec.indeterminate) if calibration.spec.indeterminate else None,
            "indeterminate_share": calibration.band_share,
            "sensitivity": calibration.sensitivity,
            "specificity": calibration.specificity,
            "variants": {
                v: {"chosen": c.calibrator.method, "calibrator": c.calibrator.describe(),
                    "before": dataclasses.asdict(c.raw), "after": dataclasses.asdict(c.chosen),
                    "candidates": [dataclasses.asdict(m) for m in c.scores]}
                for v, c in calibration.choices.items()
            },
        },
        "cv_seconds": cv.seconds,
    }
    (out_dir / "metrics.json").write_text(
        json.dumps(metrics, indent=1, default=float) + "\n", encoding="utf-8"
    )
    return EvaluationResult(out_dir, report, summary, explanation, cv.seconds + time.monotonic() - started)


def evaluate_cohort(
    cohort_dir: Path, out_dir: Path, config: TrainConfig, *, read_events: BundleEventReader, progress: bool = True
) -> EvaluationResult:
    """Cross-validate every branch mode on `cohort_dir` and write the report to `out_dir`; bundles are
    read with `read_events` (the serving reader, as in `train_model`)."""
    card = base_card(config, Path(out_dir) / "unused-model")
    cohort = load_cohort(cohort_dir, card, read_events=read_events, progress=progress)
    cv = cross_validate(cohort, card, config, MODES, progress=progress)
    return evaluate_cv(cohort, cv, out_dir, cohort_dir=cohort_dir)


__all__ = [
    "LABELS",
    "EvaluationResult",
    "ExplanationSummary",
    "add_baselines",
    "evaluate_cohort",
    "evaluate_cv",
    "explain_fold",
    "lesion_mass",
    "read_lesions",
]
