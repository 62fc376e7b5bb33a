"""The model card as a document a person reads (`dicom-fusion model card PATH`).

The TOML card is written for workers; a clinician, an operator or an auditor asks other questions: what is
the model for, what was it trained on, how good is it and how sure are we, are its probabilities honest,
where does it decide and where does it leave the decision to a person, what are its limits. This module
answers them from the card alone (numbers from `metrics`, written by `train/classifier.card_metrics`), as
plain text with Markdown headings, so it reads the same in a terminal and in a file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from dicom_fusion.inference.card.model import INDETERMINATE, LOINC, SNOMED, ModelCard

_SYSTEMS = {SNOMED: "SNOMED CT", LOINC: "LOINC"}
NOT_STATED = "not stated in the model card"


def _num(metrics: Mapping[str, float], key: str, digits: int = 3) -> str | None:
    value = metrics.get(key)
    return None if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mean_sd(metrics: Mapping[str, float], prefix: str, name: str) -> str | None:
    mean, sd = _num(metrics, f"{prefix}_{name}_mean"), _num(metrics, f"{prefix}_{name}_sd")
    return None if mean is None else f"{mean} ± {sd or '?'}"


def _training(card: ModelCard) -> list[str]:
    m = card.metrics
    if "n_patients" not in m:
        return ["- No training record in the card (an untrained or hand-written card)."]
    lines = [f"- Cohort: {int(m['n_patients'])} patients, prevalence of {card.positive_class} "
             f"{m.get('prevalence', math.nan):.1%}, seed {int(m.get('seed', 0))}."]
    if "cv_folds" in m:
        lines.append(f"- Validation: stratified {int(m['cv_folds'])}-fold cross-validation by patient; every figure "
                     "below comes from held-out folds.")
    if "final_epochs" in m:
        lines.append(f"- Final model: trained on every patient for {int(m['final_epochs'])} epochs (the median "
                     "early-stopping epoch of the folds).")
    return lines


def _performance(card: ModelCard) -> list[str]:
    m = card.metrics
    lines = []
    for prefix, label in (("cv", "With the EHR timeline"), ("cv_no_ehr", "Image only (EHR withheld)")):
        auc = _mean_sd(m, prefix, "roc_auc")
        if auc is None:
            continue
        ci = ""
        ci_key = "oof" if prefix == "cv" else "oof_no_ehr"
        low, high = _num(m, f"{ci_key}_roc_auc_ci_low"), _num(m, f"{ci_key}_roc_auc_ci_high")
        if low is not None and high is not None:
            ci = f" (pooled out-of-fold 95 % CI {low}–{high}, bootstrap)"
        others = ", ".join(f"{name} {v}" for name, key in (("F1", "f1"), ("ECE", "ece"), ("Brier", "brier"))
                           if (v := _mean_sd(m, prefix, key)) is not None)
        lines.append(f"- {label}: ROC-AUC {auc} (mean ± sd over folds){ci}; {others} at threshold 0.5, "
                     "uncalibrated.")
        calibrated = ", ".join(f"{name} {v}" for name, key in (("sensitivity", "recall"), ("precision", "precision"),
                                                                ("F1", "f1"), ("ECE", "ece"))
                               if (v := _mean_sd(m, f"{prefix}_calibrated", key)) is not None)
        if calibrated:
            lines.append(f"  Calibrated, at the card's threshold: {calibrated}.")
    return lines or ["- No cross-validated metrics in the card."]


def _calibration(card: ModelCard) -> list[str]:
    cal, m = card.calibration, card.metrics
    if cal is None:
        return ["- None: the probabilities are the network's softmax output (identity)."]
    lines = [f"- With the EHR timeline: {cal.describe()}.",
             f"- Image only (EHR withheld): {cal.for_path(True).describe()}."]
    for key, label in (("oof", "with EHR"), ("oof_no_ehr", "image only")):
        before, after = _num(m, f"{key}_ece_before"), _num(m, f"{key}_ece_after")
        if before is not None and after is not None:
            brier = ""
            b0, b1 = _num(m, f"{key}_brier_before"), _num(m, f"{key}_brier_after")
            if b0 is not None and b1 is not None:
                brier = f", Brier score {b0} → {b1}"
            lines.append(f"- ECE {label} {before} → {after}{brier} (pooled out-of-fold predictions; after = "
                         "calibrated by a calibrator fitted on the other folds).")
    lines.append("- Fitted on the out-of-fold predictions of the cross-validation; method chosen by "
                 "cross-validated ECE among identity, temperature, Platt and isotonic.")
    return lines


def _threshold(card: ModelCard) -> list[str]:
    cal, m = card.calibration, card.metrics
    target = cal.target_sensitivity if cal is not None else None
    if target is None:
        return [f"- {card.threshold} on the probability of {card.positive_class}: fixed, not chosen from data."]
    line = (f"- {card.threshold} on the calibrated probability of {card.positive_class}: the highest threshold that "
            f"keeps sensitivity ≥ {target:.0%} on the out-of-fold predictions")
    sens, spec = m.get("oof_sensitivity"), m.get("oof_specificity")
    if sens is not None and spec is not None:
        line += f" (there: sensitivity {sens:.1%}, specificity {spec:.1%})"
    return [line + "."]


def _band(card: ModelCard) -> list[str]:
    band = card.calibration.indeterminate if card.calibration is not None else None
    if band is None:
        return ["- None: every prediction is reported as a class."]
    line = (f"- [{band[0]}, {band[1]}]: a calibrated probability inside it is reported \"{INDETERMINATE.name}\" "
            f"(SNOMED CT {INDETERMINATE.code}) instead of a class, and the review worklist lists it first")
    share = card.metrics.get("oof_indeterminate_share")
    if share is not None:
        line += f"; {share:.1%} of the out-of-fold patients fell in it"
    return [line + "."]


def _ensemble(card: ModelCard) -> list[str]:
    if card.ensemble is None:
        return ["- A single network."]
    members = 1 + len(card.ensemble.members)
    lines = [f"- {members} networks (this card's weights and {', '.join(card.ensemble.members)}), the fold models of "
             "one cross-validation; their raw probabilities are averaged, then calibrated; the spread (standard "
             "deviation of their calibrated probabilities) is reported with every result."]
    if card.ensemble.max_spread is not None:
        lines.append(f"- Members disagree above a spread of {card.ensemble.max_spread}: such a result is reported "
                     f"\"{INDETERMINATE.name}\" whatever the mean.")
    lines.append("- The performance figures above are those of the members on their held-out folds; the ensemble "
                 "itself is measured on a fresh cohort by `dicom-fusion model compare`.")
    return lines


def _drift(card: ModelCard) -> list[str]:
    if card.drift is None:
        return ["- No reference: the service cannot tell when its inputs move away from the validation cohort; "
                "add one with `dicom-fusion model reference CARD --cohort DIR`."]
    source = f" from {card.drift.source}" if card.drift.source else ""
    return [f"- Reference{source}: {len(card.drift.items)} items ({', '.join(sorted(card.drift.items))}); the service "
            f"compares its last {card.drift.window} jobs with it (PSI > 0.25 = drift)."]


def _limitations(card: ModelCard) -> list[str]:
    lines = []
    text = (card.intended_use or "").lower()
    if "synthetic" in text:
        lines.append("- Trained and validated on synthetic patients only: its figures say nothing about real "
                     "patients, scanners or EHRs. Not for clinical use.")
    if "prevalence" in card.metrics:
        lines.append(f"- Calibration and threshold hold at the training prevalence ({card.metrics['prevalence']:.0%}); "
                     "another population shifts both.")
    if card.calibration is not None and card.ensemble is not None:
        lines.append("- The calibrator was fitted on the members' out-of-fold predictions one network at a time and "
                     "is applied to their average, which is a little less extreme than one network.")
    elif card.calibration is not None:
        lines.append("- The calibrator was fitted on the fold models' out-of-fold predictions and is applied to the "
                     "final model trained on every patient, which may be slightly more or less confident.")
    else:
        lines.append("- Probabilities are not calibrated: read them as scores, not as frequencies.")
    no_ehr, full = card.metrics.get("cv_no_ehr_roc_auc_mean"), card.metrics.get("cv_roc_auc_mean")
    if no_ehr is not None and full is not None:
        lines.append(f"- Without the EHR timeline it is weaker (ROC-AUC {no_ehr:.3f} against {full:.3f}); such "
                     "results say so.")
    lines.append(f"- Reads only {', '.join(card.input.modalities)} series and the {len(card.timeline.features)} EHR "
                 f"features listed; anything else is ignored.")
    return lines


def card_document(card: ModelCard) -> str:
    """The card as a readable model card: identity, intended use, inputs and outputs, training data,
    metrics with confidence intervals, calibration, threshold, indeterminate band, limitations."""
    image = card.image
    size = " × ".join(str(s) for s in image.size)
    lesion = (f" + lesion probability channel from segmenter {card.segmenter.parent.name}"
              if image.lesion_channel and card.segmenter is not None else "")
    classes = "; ".join(f"{c.name} ({_SYSTEMS.get(c.system, c.system)} {c.code} \"{c.display}\")" for c in card.classes)
    features = ", ".join(f"{f.name}" + (f" ({f.unit})" if f.unit else "") for f in card.timeline.features)
    sections: list[tuple[str, list[str]]] = [
        ("Intended use", [card.intended_use or NOT_STATED]),
        ("Inputs and outputs", [
            f"- Series: {', '.join(card.input.modalities)} (rule {card.input.series_rule}); image {image.spatial_dims}D "
            f"{size}, {image.channels} channel(s){lesion}; encoder {image.encoder}.",
            f"- EHR timeline: {len(card.timeline.features)} features over {card.timeline.window_days} days in "
            f"{card.timeline.bin_days}-day bins: {features}.",
            f"- Classes: {classes}; positive class {card.positive_class}.",
        ]),
        ("Training data", _training(card)),
        ("Performance", _performance(card)),
        ("Calibration", _calibration(card)),
        ("Decision threshold", _threshold(card)),
        ("Indeterminate band", _band(card)),
        ("Ensemble", _ensemble(card)),
        ("Drift monitoring", _drift(card)),
        ("Limitations", _limitations(card)),
    ]
    out = [f"# Model card: {card.name} {card.version}", "",
           f"Card {card.path}; weights {card.weights.name} (sha256 {card.sha256[:12]}…).", ""]
    for title, lines in sections:
        out += [f"## {title}", "", *lines, ""]
    return "\n".join(out)


__all__ = ["NOT_STATED", "card_document"]
