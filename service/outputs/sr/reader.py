"""Read an SR written by `sr.build_sr` back through highdicom, as a PACS-side consumer would.

`read_sr` walks the TID 1500 tree with highdicom's own accessors (observer contexts, image
measurement groups, measurements, qualitative evaluations, source images) and fails on the first
item that is missing, duplicated or wrong; `check_sr` also compares what it read with the
`InferenceResult` the SR was built from. Both live apart from the builder so each stays small;
`dicom_fusion.service.outputs.sr.build` re-exports them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import highdicom as hd
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, Comprehensive3DSRStorage

from dicom_fusion.service.errors import SRValidationError
from dicom_fusion.service.outputs import concepts

if TYPE_CHECKING:
    from dicom_fusion.inference.serve.predict import InferenceResult
    from dicom_fusion.service.outputs.seg.build import LesionMeasurement

__all__ = ["ReportedClass", "ReportedLesion", "ReportedResult", "check_sr", "read_sr"]

_PROBABILITY_TOLERANCE = 1e-9  # NUM items also carry the exact FD value; DS alone keeps ~15 digits


@dataclass(frozen=True)
class ReportedClass:
    """One output class as read back from an SR: its code and its probability."""

    code: str
    scheme_designator: str
    meaning: str
    probability: float


@dataclass(frozen=True)
class ReportedLesion:
    """A TID 1410/1411 lesion group: its size and the SEG segment it was measured on."""

    kind: str  # "area" (mm2) or "volume" (mm3)
    value: float
    segmentation_sop_instance_uid: str
    segment_number: int
    finding_code: str
    centroid: str | None


@dataclass(frozen=True)
class ReportedResult:
    """What `read_sr` found in an SR written by `build_sr`."""

    study_instance_uid: str
    sop_instance_uid: str
    model_name: str
    model_version: str
    device_observer_uid: str
    probabilities: tuple[ReportedClass, ...]
    finding: ReportedClass
    image_only: bool
    image_only_reason: str | None
    source_sop_instance_uids: tuple[str, ...]
    drivers: tuple[str, ...] = ()  # "name +0.123 toward <class>" per EHR timeline driver, in order
    saliency_sop_instance_uid: str | None = None  # the referenced Grad-CAM Secondary Capture
    lesions: tuple[ReportedLesion, ...] = ()  # segmented lesions (SEG) with their area / volume
    verified: bool = False  # VerificationFlag VERIFIED: a clinician approved it (README "Review")
    reviewer: str | None = None  # the Verifying Observer Name of a verified SR
    review: tuple[str, ...] = ()  # the review decision and comment TEXT items, in order
    calibration: str | None = None  # how the probabilities were calibrated (model card `[calibration]`)
    indeterminate: bool = False  # the finding is "indeterminate" (probability in the card's band), not a class


def read_sr(ds: Dataset) -> ReportedResult:
    """Read an SR written by `build_sr` back through highdicom, checking its structure.

    Raises:
        TypeError: if `ds` is not a pydicom Dataset.
        SRValidationError: naming the first item that is missing, duplicated or wrong.
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f"Expected a pydicom Dataset, got {type(ds).__name__}.")
    sop_class = ds.get("SOPClassUID")
    if sop_class != Comprehensive3DSRStorage:
        name = UID(sop_class).name if sop_class else "missing"
        raise SRValidationError(
            f"SOP Class UID is {sop_class} ({name}); expected Comprehensive 3D SR Storage."
        )
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SRValidationError(f"highdicom cannot read the SR content tree: {exc}") from exc
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise SRValidationError("Root container is not a TID 1500 Measurement Report.")

    observers = report.get_observer_contexts(observer_type=concepts.OBSERVER_TYPE_DEVICE)
    if len(observers) != 1:
        raise SRValidationError(f"Expected 1 device observer context, found {len(observers)}.")
    groups = report.get_image_measurement_groups()
    if len(groups) != 1:
        raise SRValidationError(f"Expected 1 TID 1501 measurement group, found {len(groups)}.")
    group = groups[0]
    model_name = _one_text(group, dcm_codes.DCM.AlgorithmName, "Algorithm Name")
    model_version = _one_text(group, dcm_codes.DCM.AlgorithmVersion, "Algorithm Version")

    probabilities: list[ReportedClass] = []
    for index, measurement in enumerate(group.get_measurements(), 1):
        concept, value = measurement.name, measurement.value
        label = f'Measurement #{index} ({concept.value}, {concept.scheme_designator}, "{concept.meaning}")'
        if measurement.unit != concepts.PROBABILITY_UNIT:
            raise SRValidationError(f'{label} has unit "{measurement.unit.value}"; expected UCUM "1".')
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise SRValidationError(f"{label} has value {value}; a probability must be in [0, 1].")
        key = (concept.value, concept.scheme_designator)
        if any((p.code, p.scheme_designator) == key for p in probabilities):
            raise SRValidationError(f"{label} repeats a class already measured.")
        probabilities.append(ReportedClass(concept.value, concept.scheme_designator, concept.meaning, value))
    if not probabilities:
        raise SRValidationError("The measurement group holds no class probability (NUM) items.")

    evaluations = group.get_qualitative_evaluations(name=concepts.FINDING_EVALUATION)
    if len(evaluations) != 1:
        raise SRValidationError(
            f'Expected 1 qualitative evaluation "{concepts.FINDING_EVALUATION.meaning}", '
            f"found {len(evaluations)}."
        )
    found = cast(hd.sr.CodedConcept, evaluations[0].value)  # highdicom annotates it as a number
    finding = next(
        (p for p in probabilities if (p.code, p.scheme_designator) == (found.value, found.scheme_designator)),
        None,
    )
    indeterminate = (found.value, found.scheme_designator) == (
        concepts.INDETERMINATE_FINDING.value, concepts.INDETERMINATE_FINDING.scheme_designator)
    if finding is None and indeterminate:  # no class decided: the finding has no probability of its own
        finding = ReportedClass(found.value, found.scheme_designator, found.meaning, math.nan)
    if finding is None:
        raise SRValidationError(
            f'Finding ({found.value}, {found.scheme_designator}, "{found.meaning}") is not one of '
            "the measured classes."
        )
    if group.finding_type != found:
        raise SRValidationError(
            f"Finding type {_describe(group.finding_type)} differs from the finding evaluation "
            f"({found.value}, {found.scheme_designator})."
        )

    flags = [
        item.value
        for item in find_content_items(
            group[0], name=concepts.IMAGE_ONLY_COMMENT, value_type=hd.sr.ValueTypeValues.TEXT
        )
        if item.value.startswith(concepts.IMAGE_ONLY_PREFIX)
    ]
    if len(flags) > 1:
        raise SRValidationError(f'Found {len(flags)} "{concepts.IMAGE_ONLY_PREFIX}" items; expected at most 1.')
    reason = None
    if flags:
        reason = flags[0][len(concepts.IMAGE_ONLY_PREFIX):].removeprefix(": ") or None

    calibrations = [
        item.value[len(concepts.CALIBRATION_PREFIX):].removeprefix(": ")
        for item in find_content_items(group[0], name=concepts.CALIBRATION_COMMENT, value_type=hd.sr.ValueTypeValues.TEXT)
        if item.value.startswith(concepts.CALIBRATION_PREFIX)
    ]
    if len(calibrations) > 1:
        raise SRValidationError(f'Found {len(calibrations)} "{concepts.CALIBRATION_PREFIX}" items; expected at most 1.')
    drivers = tuple(
        item.value[len(concepts.TIMELINE_DRIVER_PREFIX):].removeprefix(": ")
        for item in find_content_items(
            group[0], name=concepts.TIMELINE_DRIVER_COMMENT, value_type=hd.sr.ValueTypeValues.TEXT
        )
        if item.value.startswith(concepts.TIMELINE_DRIVER_PREFIX)
    )
    review = tuple(
        item.value
        for item in find_content_items(group[0], name=concepts.REVIEW_COMMENT, value_type=hd.sr.ValueTypeValues.TEXT)
        if item.value.startswith((concepts.REVIEW_DECISION_PREFIX, concepts.REVIEW_COMMENT_PREFIX))
    )
    verified = str(ds.get("VerificationFlag", "")) == "VERIFIED"
    if verified != any(v.startswith(concepts.REVIEW_DECISION_PREFIX) for v in review):
        raise SRValidationError("A VERIFIED SR holds its review decision, an UNVERIFIED one none: "
                                f"VerificationFlag {ds.get('VerificationFlag')!r}, {len(review)} review item(s).")
    observers_seq = ds.get("VerifyingObserverSequence") or []
    reviewer = str(observers_seq[0].VerifyingObserverName) if verified and observers_seq else None
    images = find_content_items(group[0], name=concepts.SALIENCY_IMAGE, value_type=hd.sr.ValueTypeValues.IMAGE)
    if len(images) > 1:
        raise SRValidationError(f"Found {len(images)} saliency images; expected at most 1.")
    saliency = str(images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID) if images else None

    sources = tuple(str(image.referenced_sop_instance_uid) for image in group.source_images)
    if not sources:
        raise SRValidationError("The measurement group references no source image.")
    evidence = {str(uid) for _, _, uid, _ in sr.get_evidence()}
    missing = [uid for uid in (*sources, *([saliency] if saliency else [])) if uid not in evidence]
    if missing:
        raise SRValidationError(
            f"{len(missing)} image(s) referenced by the measurement group are not listed as evidence "
            "(Current Requested Procedure / Pertinent Other Evidence Sequence)."
        )
    lesions = _read_lesions(report, evidence)
    return ReportedResult(
        study_instance_uid=str(sr.StudyInstanceUID),
        sop_instance_uid=str(sr.SOPInstanceUID),
        model_name=model_name,
        model_version=model_version,
        device_observer_uid=str(
            cast(hd.sr.DeviceObserverIdentifyingAttributes, observers[0].observer_identifying_attributes).uid
        ),
        probabilities=tuple(probabilities),
        finding=finding,
        image_only=bool(flags),
        image_only_reason=reason,
        source_sop_instance_uids=sources,
        drivers=drivers,
        saliency_sop_instance_uid=saliency,
        lesions=lesions,
        verified=verified,
        reviewer=reviewer,
        review=review,
        calibration=calibrations[0] if calibrations else None,
        indeterminate=indeterminate,
    )


def check_sr(ds: Dataset, expected: InferenceResult | None = None, *,
             expected_lesion: LesionMeasurement | None = None) -> None:
    """Check that `ds` is an SR as `build_sr` writes it and, given `expected`, that it reports
    exactly that result (model, class probabilities in order, finding, image-only flag); given
    `expected_lesion`, that it holds exactly one lesion group with that area / volume.

    Raises:
        SRValidationError: with a message naming the first difference.
    """
    reading = read_sr(ds)
    if expected_lesion is not None:
        if len(reading.lesions) != 1:
            raise SRValidationError(f"The SR holds {len(reading.lesions)} lesion groups, 1 expected.")
        got = reading.lesions[0]
        if got.kind != expected_lesion.kind or not math.isclose(got.value, expected_lesion.value, rel_tol=1e-9):
            raise SRValidationError(
                f"Lesion {got.kind} is {got.value} in the SR, {expected_lesion.kind} {expected_lesion.value} expected."
            )
    if expected is None:
        return
    for field in ("model_name", "model_version"):
        if getattr(reading, field) != getattr(expected, field):
            raise SRValidationError(
                f"{field} is {getattr(reading, field)!r} in the SR, {getattr(expected, field)!r} expected."
            )
    expected_classes = list(expected.probabilities)
    if len(reading.probabilities) != len(expected_classes):
        raise SRValidationError(
            f"The SR holds {len(reading.probabilities)} class probabilities, "
            f"{len(expected_classes)} expected."
        )
    for index, (got, want) in enumerate(zip(reading.probabilities, expected_classes, strict=True), 1):
        _compare_class(f"Class #{index}", got, want)
    _compare_class("Finding", reading.finding, expected.finding)
    if reading.image_only != bool(expected.image_only):
        raise SRValidationError(
            f"Image-only flag is {reading.image_only} in the SR, {bool(expected.image_only)} expected."
        )
    want_calibration = getattr(expected, "calibration", "") or None
    if reading.calibration != want_calibration:
        raise SRValidationError(f"Calibration is {reading.calibration!r} in the SR, {want_calibration!r} expected.")
    want_drivers = tuple(getattr(expected, "driver_lines", lambda: ())())
    if reading.drivers != want_drivers:
        raise SRValidationError(f"Timeline drivers are {reading.drivers} in the SR, {want_drivers} expected.")
    want_reason = (expected.image_only_reason or None) if expected.image_only else None
    if reading.image_only_reason != want_reason:
        raise SRValidationError(
            f"Image-only reason is {reading.image_only_reason!r} in the SR, {want_reason!r} expected."
        )


# --- helpers -----------------------------------------------------------------------------------


def _one_text(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: Code, label: str) -> str:
    items = find_content_items(group[0], name=name, value_type=hd.sr.ValueTypeValues.TEXT)
    if len(items) != 1:
        raise SRValidationError(f'Expected 1 "{label}" item in the measurement group, found {len(items)}.')
    return str(items[0].value)


def _describe(concept: hd.sr.CodedConcept | None) -> str:
    return "missing" if concept is None else f"({concept.value}, {concept.scheme_designator})"


def _compare_class(label: str, got: ReportedClass, want: object) -> None:
    concept = concepts.coded_concept(want.system, want.code, want.display)  # type: ignore[attr-defined]
    if (got.code, got.scheme_designator) != (concept.value, concept.scheme_designator):
        raise SRValidationError(
            f"{label} is ({got.code}, {got.scheme_designator}) in the SR, "
            f"({concept.value}, {concept.scheme_designator}) expected."
        )
    if got.meaning != concept.meaning:
        raise SRValidationError(
            f'{label} meaning is "{got.meaning}" in the SR, "{concept.meaning}" expected.'
        )
    probability = float(want.probability)  # type: ignore[attr-defined]
    if math.isnan(got.probability) and got.code == concepts.INDETERMINATE_FINDING.value:
        return  # an indeterminate finding carries no probability in the SR (the classes' NUMs do)
    if abs(got.probability - probability) > _PROBABILITY_TOLERANCE:
        raise SRValidationError(
            f"{label} ({got.code}) probability is {got.probability} in the SR, {probability} expected."
        )


_LESION_SIZES = {"area": (concepts.LESION_AREA, concepts.AREA_UNIT), "volume": (concepts.LESION_VOLUME, concepts.VOLUME_UNIT)}


def _read_lesions(report: hd.sr.MeasurementReport, evidence: set[str]) -> tuple[ReportedLesion, ...]:
    """The TID 1410 (planar) and 1411 (volumetric) groups that `seg.lesion_measurement_group` writes."""
    lesions = []
    groups = [("area", g) for g in report.get_planar_roi_measurement_groups()]
    groups += [("volume", g) for g in report.get_volumetric_roi_measurement_groups()]
    for index, (kind, group) in enumerate(groups, 1):
        label = f"Lesion group #{index}"
        name, unit = _LESION_SIZES[kind]
        sizes = group.get_measurements(name=name)
        if len(sizes) != 1:
            raise SRValidationError(f'{label}: expected 1 "{name.meaning}" measurement, found {len(sizes)}.')
        size = sizes[0]
        if size.unit != unit or not (math.isfinite(size.value) and size.value > 0):
            raise SRValidationError(f"{label}: {kind} {size.value} {size.unit.value}; expected > 0 {unit.value}.")
        ref_name = dcm_codes.DCM.ReferencedSegmentationFrame if kind == "area" else dcm_codes.DCM.ReferencedSegment
        refs = find_content_items(group[0], name=ref_name, value_type=hd.sr.ValueTypeValues.IMAGE)
        if len(refs) != 1:
            raise SRValidationError(f"{label}: expected 1 reference to a SEG segment, found {len(refs)}.")
        sop = refs[0].ReferencedSOPSequence[0]
        seg_uid = str(sop.ReferencedSOPInstanceUID)
        if seg_uid not in evidence:
            raise SRValidationError(f"{label}: the referenced SEG {seg_uid} is not listed as evidence.")
        centroid = [
            str(item.value) for item in find_content_items(
                group[0], name=concepts.LESION_CENTROID_COMMENT, value_type=hd.sr.ValueTypeValues.TEXT)
            if str(item.value).startswith(concepts.LESION_CENTROID_PREFIX)
        ]
        finding = group.finding_type
        lesions.append(ReportedLesion(
            kind=kind, value=float(size.value), segmentation_sop_instance_uid=seg_uid,
            segment_number=int(sop.get("ReferencedSegmentNumber", 1)),  # a frame reference omits it
            finding_code=finding.value if finding else "",
            centroid=centroid[0] if centroid else None,
        ))
    return tuple(lesions)
