"""DICOM Structured Report of an inference result: Comprehensive 3D SR holding a TID 1500 report.

The SR is what the radiologist sees in the PACS next to the images, so it follows the standard
template that viewers understand (TID 1500 "Measurement Report") rather than free text:

- observer context: the model as a *device* observer (TID 1004), its UID derived from the model name;
- procedure reported: an imaging procedure;
- one TID 1501 measurement group with a tracking identifier, the predicted class as finding type,
  the algorithm (TID 4019: model name + version), one NUM per class probability (unit UCUM "1"),
  the predicted class again as a coded qualitative evaluation, a TEXT flag when the EHR timeline was
  not used, one TEXT item per EHR timeline driver of the explanation, an IMAGE item referencing the
  Grad-CAM Secondary Capture when there is one, and a reference to every source image.

Patient and study come from the source images (highdicom copies them from the evidence), after
zero or empty optional patient attributes are dropped, because modalities write ``PatientWeight``
0 for "unknown" and `dciodvfy` flags that in the SR.

Everything in the document derives from the inputs and the UIDs given, so a redelivered task builds
byte-identical SRs (pass ``content_datetime``; it stands in for every "now" highdicom would write).
`read_sr` / `check_sr` (from `sr/reader.py`, re-exported here) read an SR back through highdicom, the
same way a consumer would.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from io import BytesIO
from typing import TYPE_CHECKING

import highdicom as hd

# highdicom's own IOD/module tables (private, but highdicom is pinned): the SR copies the patient and
# study modules by these tables, so the clean-up of the evidence uses exactly the same list.
from highdicom._standard_utils import (
    get_iod_module_map,
    get_module_attribute_map,
    get_sop_class_iod_map,
)
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.tag import BaseTag
from pydicom.uid import RE_VALID_UID, UID, generate_uid
from pydicom.valuerep import DA, DT, TM

from dicom_fusion.service.outputs import concepts
from dicom_fusion.service.outputs.identity import MANUFACTURER, device_observer_uid
from dicom_fusion.service.outputs.sr.reader import ReportedClass, ReportedResult, check_sr, read_sr

if TYPE_CHECKING:
    from dicom_fusion.inference.serve.predict import InferenceResult
    from dicom_fusion.service.outputs.seg.build import LesionMeasurement

__all__ = [
    "MANUFACTURER",
    "ReportedClass",
    "ReportedResult",
    "SrVerification",
    "build_sr",
    "person_name",
    "rejection_lines",
    "review_lines",
    "check_sr",
    "read_sr",
    "source_header",
    "sr_to_bytes",
]

# Patient-level type 2 attributes highdicom reads from the first evidence dataset with attribute
# access; a source that lacks one gets it empty (type 2 allows that) instead of an AttributeError.
_TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)
_NUMERIC_VRS = frozenset({"DS", "IS", "FL", "FD", "US", "SS", "UL", "SL", "UV", "SV"})


@dataclass(frozen=True)
class SrVerification:
    """A clinician's approval of the result (README "Review"): the SR becomes VERIFIED and FINAL, names the
    reviewer in the Verifying Observer Sequence and holds the decision and comment as TEXT items.

    `model_finding` is the model's own finding (any object with system, code, display, probability) when
    the reviewer chose another class; the SR then reports the reviewer's class and keeps the model's in
    the decision text, next to the model's unchanged class probabilities.
    """

    observer_name: str  # the reviewer's display name ("Jane Smith") or a DICOM PN ("Smith^Jane")
    organization: str
    at: datetime
    comment: str = ""
    model_finding: object | None = None


def person_name(display: str) -> str:
    """A display name as a DICOM PN: "Jane Q Smith" → "Smith^Jane Q"; a value with "^" is kept."""
    display = " ".join(display.split())
    if "^" in display or not display:
        return display
    *given, family = display.split(" ")
    return f"{family}^{' '.join(given)}"


def build_sr(
    sources: Sequence[Dataset],
    result: InferenceResult,
    *,
    sr_instance_uid: str,
    sr_series_uid: str,
    series_number: int = 999,
    institution_name: str | None = None,
    content_datetime: datetime | None = None,
    saliency: Dataset | None = None,
    segmentation: Dataset | None = None,
    lesion: LesionMeasurement | None = None,
    verification: SrVerification | None = None,
    predecessor: Dataset | None = None,
) -> Dataset:
    """Build the Comprehensive 3D SR (TID 1500) reporting `result` for the `sources` images.

    `sources` are the instances the model saw (headers suffice: read with
    ``stop_before_pixels=True``), all of one study; the SR joins that study and patient. `result` is
    any object with the attributes of `InferenceResult`. `content_datetime` (default: now) is
    written as the content, instance creation and contribution date/time; an aware datetime is
    first converted to this host's local time (DICOM times without an offset are local). The
    returned dataset is a `highdicom.sr.Comprehensive3DSR`. `saliency` (the Grad-CAM Secondary
    Capture, `saliency.build_saliency_sc`) is referenced from the measurement group and listed as
    evidence; send it to the PACS with the SR. `segmentation` (the lesion SEG, `seg.build_segmentation`)
    with its `lesion` measurement adds a TID 1410/1411 group referencing the SEG segment (`outputs/seg/build.py`).
    Without `verification` the SR is COMPLETE, UNVERIFIED and PRELIMINARY (nobody has looked at it); with
    it, VERIFIED and FINAL (see :class:`SrVerification`). `predecessor` is an earlier SR of this result
    already in the PACS (the unverified one sent before review): the new SR references it in its
    Predecessor Documents Sequence and takes its instance number + 1.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if the sources or the result are unusable (no sources, several studies, not
            images, a probability outside [0, 1], a finding neither a class nor indeterminate...).
    """
    headers = _evidence_headers(sources)
    _check_uid("sr_instance_uid", sr_instance_uid)
    _check_uid("sr_series_uid", sr_series_uid)
    if sr_instance_uid == sr_series_uid:
        raise ValueError('Arguments "sr_instance_uid" and "sr_series_uid" must differ.')
    if sr_series_uid in {h.SeriesInstanceUID for h in headers}:
        raise ValueError('Argument "sr_series_uid" must not be the series of a source image.')
    if isinstance(series_number, bool) or not isinstance(series_number, int) or series_number < 1:
        raise ValueError(f'Argument "series_number" must be a positive int, got {series_number!r}.')
    if content_datetime is None:
        content_datetime = datetime.now()
    elif not isinstance(content_datetime, datetime):
        raise TypeError('Argument "content_datetime" must be a datetime.datetime or None.')
    # DICOM dates and times without an offset are local time, like the study's own.
    when = content_datetime
    if when.tzinfo is not None:
        when = when.astimezone().replace(tzinfo=None)

    model_name, model_version = _text(result, "model_name"), _text(result, "model_version")
    measured, finding = _classes(result)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[sr_instance_uid, "tracking"]),
            identifier=concepts.ALGORITHM_GROUP_TRACKING_IDENTIFIER,
        ),
        finding_type=finding,
        algorithm_id=hd.sr.AlgorithmIdentification(name=model_name, version=model_version),
        measurements=[
            hd.sr.Measurement(name=concept, value=probability, unit=concepts.PROBABILITY_UNIT)
            for concept, probability in measured
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=concepts.FINDING_EVALUATION, value=finding)
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(h) for h in headers],
    )
    if _flag(result, "image_only"):
        reason = getattr(result, "image_only_reason", None)
        text = concepts.IMAGE_ONLY_PREFIX + (f": {reason}" if reason else "")
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=concepts.IMAGE_ONLY_COMMENT,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    content = group[0].ContentSequence
    calibration = getattr(result, "calibration", "")
    if isinstance(calibration, str) and calibration.strip():
        content.insert(_after_algorithm(content),
                       _text_item(concepts.CALIBRATION_COMMENT, f"{concepts.CALIBRATION_PREFIX}: {calibration}"))
    uncertainty = getattr(result, "uncertainty", "")
    if isinstance(uncertainty, str) and uncertainty.strip():
        content.append(_text_item(concepts.UNCERTAINTY_COMMENT, f"{concepts.UNCERTAINTY_PREFIX}: {uncertainty}"))
    if _is_indeterminate(finding):
        positive = getattr(result, "positive_class", "") or "the positive class"
        p = float(getattr(result.finding, "probability", math.nan))
        why = getattr(result, "indeterminate_reason", "")
        if not (isinstance(why, str) and why.strip()):
            why = (f"the calibrated probability of {positive} ({p:.2f}) lies in the model's indeterminate band "
                   "around its decision threshold")
        content.append(_text_item(
            concepts.INDETERMINATE_COMMENT,
            f"{concepts.INDETERMINATE_PREFIX}: {why}; no class is reported, a clinician decides"[:1024],
        ))
    for line in getattr(result, "driver_lines", lambda: ())():
        content.append(
            hd.sr.TextContentItem(
                name=concepts.TIMELINE_DRIVER_COMMENT,
                value=f"{concepts.TIMELINE_DRIVER_PREFIX}: {line}"[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    if verification is not None:
        for line in review_lines(verification, result):
            content.append(hd.sr.TextContentItem(name=concepts.REVIEW_COMMENT, value=line[:1024],
                                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    evidence = list(headers)
    if saliency is not None:
        if saliency.StudyInstanceUID != headers[0].StudyInstanceUID:
            raise ValueError("The saliency image belongs to another study than the sources.")
        content.append(
            hd.sr.ImageContentItem(
                name=concepts.SALIENCY_IMAGE,
                referenced_sop_class_uid=saliency.SOPClassUID,
                referenced_sop_instance_uid=saliency.SOPInstanceUID,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
        evidence.append(_header_copy(saliency))
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
                 | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = [group]
    if segmentation is not None:
        from dicom_fusion.service.outputs.seg.build import lesion_measurement_group

        if lesion is None or segmentation.StudyInstanceUID != headers[0].StudyInstanceUID:
            raise ValueError("A segmentation needs its lesion measurement and the sources' study.")
        groups.append(lesion_measurement_group(segmentation, headers, lesion, sr_instance_uid=sr_instance_uid))
        evidence.append(_header_copy(segmentation))
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(concepts.OBSERVER_TYPE_DEVICE),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(model_name),
            name=model_name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{model_name} {model_version}",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=concepts.PROCEDURE_REPORTED,
        imaging_measurements=groups,
        title=concepts.DOCUMENT_TITLE,
    )
    ours = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=dcm_codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model_name[:64],
        software_versions=model_version[:64],
        contribution_datetime=when,
        contribution_description="AI inference that produced this report",
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=sr_series_uid,
        series_number=series_number,
        sop_instance_uid=sr_instance_uid,
        instance_number=1 if predecessor is None else int(predecessor.get("InstanceNumber", 1)) + 1,
        manufacturer=MANUFACTURER,
        previous_versions=[predecessor] if predecessor is not None else None,
        is_complete=True,
        is_final=verification is not None,
        is_verified=verification is not None,
        verifying_observer_name=person_name(verification.observer_name) if verification else None,
        verifying_organization=(verification.organization or "unspecified")[:64] if verification else None,
        institution_name=institution_name,
        contributing_equipment=[ours],
        series_description=f"AI report {model_name}"[:64],
        manufacturer_model_name=model_name[:64],
        software_versions=model_version[:64],
        content_date=when.date(),
        content_time=when.time(),
    )
    # highdicom stamps these with datetime.now(); pin them so the same inputs give the same bytes.
    sr.InstanceCreationDate = DA(when.date())
    sr.InstanceCreationTime = TM(when.time())
    for item in sr.ContributingEquipmentSequence:
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = DT(when)
    if verification is not None:
        at = verification.at.astimezone().replace(tzinfo=None) if verification.at.tzinfo else verification.at
        sr.VerifyingObserverSequence[0].VerificationDateTime = DT(at)
    return sr


def review_lines(verification: SrVerification, result: object) -> list[str]:
    """The review decision and comment as the SR's TEXT items say them (the FHIR report and the ORU
    repeat these lines): "Clinical review: confirmed …" or "… changed the finding to …", then the comment."""
    finding = getattr(result, "finding", None)
    shown = getattr(finding, "display", "") or getattr(finding, "code", "")
    model = verification.model_finding
    if model is None:
        lines = [f"{concepts.REVIEW_DECISION_PREFIX}: confirmed the model's finding {shown}"]
    else:
        was = getattr(model, "display", "") or getattr(model, "code", "")
        p = getattr(model, "probability", None)
        lines = [f"{concepts.REVIEW_DECISION_PREFIX}: changed the finding to {shown}; the model's output was "
                 f"{was}" + (f" (probability {float(p):.2f})" if isinstance(p, (int, float)) else "")]
    return lines + _comment_line(verification.comment)


def rejection_lines(comment: str) -> list[str]:
    """A rejection in the words of :func:`review_lines` (the retracted report's conclusion says it)."""
    return [f"{concepts.REVIEW_DECISION_PREFIX}: rejected the AI result", *_comment_line(comment)]


def _comment_line(comment: str) -> list[str]:
    return [f"{concepts.REVIEW_COMMENT_PREFIX}: {comment.strip()}"] if comment.strip() else []


def source_header(source: Dataset) -> Dataset:
    """A source image's header for building a derived object (SC, SEG): no pixel data, and the type 2
    patient/study attributes present (empty when the modality left them out), because highdicom reads
    them with attribute access and a missing PatientSex would otherwise fail every retry."""
    return _header_copy(source)


def sr_to_bytes(ds: Dataset) -> bytes:
    """Encode an SR as a DICOM Part 10 file (preamble, file meta, dataset)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- helpers -----------------------------------------------------------------------------------


def _evidence_headers(sources: Sequence[Dataset]) -> list[Dataset]:
    if isinstance(sources, Dataset) or not isinstance(sources, Sequence):
        raise TypeError('Argument "sources" must be a sequence of pydicom Datasets.')
    if len(sources) == 0:
        raise ValueError("No source instances were provided.")
    headers = []
    for index, source in enumerate(sources, 1):
        if not isinstance(source, Dataset):
            raise TypeError(f"Source #{index} must be a pydicom Dataset, got {type(source).__name__}.")
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality"):
            if not source.get(keyword):
                raise ValueError(f"Source #{index} has no {keyword}.")
        if source.SOPClassUID not in get_sop_class_iod_map():
            raise ValueError(
                f"Source #{index} has SOP Class {source.SOPClassUID} ({UID(source.SOPClassUID).name}), "
                "which is not a storage SOP class known to highdicom."
            )
        headers.append(_header_copy(source))
    studies = {h.StudyInstanceUID for h in headers}
    if len(studies) > 1:
        raise ValueError(f"Sources belong to {len(studies)} studies; an SR reports on one study.")
    return headers


def _header_copy(source: Dataset) -> Dataset:
    """Copy the source without pixel or overlay data and without uninformative patient attributes.

    Elements are shared, not copied; the source is never modified.
    """
    header = Dataset()
    for tag in source.keys():  # noqa: SIM118 - tags only: iterating a Dataset decodes raw elements
        if tag.group == 0x7FE0 or (0x6000 <= tag.group <= 0x60FF and tag.element == 0x3000):
            continue
        header[tag] = source[tag]
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, "")
    for tag in _optional_patient_study_tags(str(header.SOPClassUID)):
        if tag in header and _uninformative(header[tag]):
            del header[tag]
    return header


@cache
def _optional_patient_study_tags(sop_class_uid: str) -> tuple[BaseTag, ...]:
    """Root-level type 3 (and 1C, never valid empty) attributes of the Patient and Study modules
    that highdicom copies from the first evidence dataset of this SOP class into the SR."""
    iod = get_sop_class_iod_map()[sop_class_uid]
    attributes = get_module_attribute_map()
    tags = []
    for module in get_iod_module_map()[iod]:
        if module["ie"] not in ("Patient", "Study"):
            continue
        for item in attributes[module["key"]]:
            if not item["path"] and item["type"] in ("3", "1C"):
                tag = tag_for_keyword(item["keyword"])
                if tag is not None:
                    tags.append(BaseTag(tag))
    return tuple(tags)


def _uninformative(element: DataElement) -> bool:
    """Empty, or a numeric value that is all zeros (how modalities write "unknown" weight/size)."""
    if element.is_empty:
        return True
    if element.VR not in _NUMERIC_VRS:
        return False
    values = element.value if element.VM > 1 else [element.value]
    try:
        return all(float(v) == 0.0 for v in values)
    except (TypeError, ValueError):
        return False


def _classes(result: object) -> tuple[list[tuple[hd.sr.CodedConcept, float]], hd.sr.CodedConcept]:
    probabilities = getattr(result, "probabilities", None)
    if isinstance(probabilities, (str, bytes)) or not isinstance(probabilities, Sequence):
        raise TypeError('Attribute "probabilities" of the result must be a sequence of ClassProbability.')
    if len(probabilities) == 0:
        raise ValueError("The result holds no class probabilities.")
    measured: list[tuple[hd.sr.CodedConcept, float]] = []
    for index, item in enumerate(probabilities, 1):
        concept = _concept(item, f"Class #{index}")
        value = getattr(item, "probability", None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Class #{index} probability must be a float, got {type(value).__name__}.")
        value = float(value)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"Class #{index} ({concept.value}) probability {value} is not in [0, 1].")
        if any(c == concept for c, _ in measured):
            raise ValueError(
                f"Class #{index} ({concept.value}, {concept.scheme_designator}) is listed twice."
            )
        measured.append((concept, value))
    finding = _concept(getattr(result, "finding", None), "Finding")
    if not any(c == finding for c, _ in measured) and not _is_indeterminate(finding):
        raise ValueError(
            f"Finding ({finding.value}, {finding.scheme_designator}) is not one of the result's classes."
        )
    return measured, finding


def _is_indeterminate(concept: hd.sr.CodedConcept) -> bool:
    """True for the indeterminate finding (the calibrated probability fell in the card's band)."""
    code = concepts.INDETERMINATE_FINDING
    return (concept.value, concept.scheme_designator) == (code.value, code.scheme_designator)


def _text_item(name: object, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value[:1024],
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _after_algorithm(content: Sequence[Dataset]) -> int:
    """Index just after the algorithm name/version items (TID 4019) of a measurement group's content, so
    the calibration TEXT stands next to the model it qualifies (end of the content if there are none)."""
    names = {dcm_codes.DCM.AlgorithmName.value, dcm_codes.DCM.AlgorithmVersion.value}
    last = -1
    for index, item in enumerate(content):
        seq = item.get("ConceptNameCodeSequence")
        if seq and seq[0].CodeValue in names:
            last = index
    return last + 1 if last >= 0 else len(content)


def _concept(item: object, label: str) -> hd.sr.CodedConcept:
    try:
        return concepts.coded_concept(item.system, item.code, item.display)  # type: ignore[attr-defined]
    except AttributeError:
        raise TypeError(f"{label} must have attributes system, code and display.") from None
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{label}: {exc}") from None


def _text(result: object, attribute: str) -> str:
    value = getattr(result, attribute, None)
    if not isinstance(value, str):
        raise TypeError(f'Attribute "{attribute}" of the result must be a str, got {type(value).__name__}.')
    if not value.strip():
        raise ValueError(f'Attribute "{attribute}" of the result must not be empty.')
    return value


def _flag(result: object, attribute: str) -> bool:
    value = getattr(result, attribute, None)
    if not isinstance(value, bool):
        raise TypeError(f'Attribute "{attribute}" of the result must be a bool, got {type(value).__name__}.')
    return value


def _check_uid(argument: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f'Argument "{argument}" must be a str, got {type(value).__name__}.')
    if len(value) > 64 or not re.fullmatch(RE_VALID_UID, value):
        raise ValueError(f'Argument "{argument}" is not a valid DICOM UID: {value!r}.')


