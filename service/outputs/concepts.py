"""Every coded concept the DICOM outputs (SR, SEG) emit, in one place (the FHIR side has its own: `fhir/codes.py`).

The SR builder (`sr/build.py`) and its reader (`sr/reader.py`) both take their concepts from here, so that a
change of code is one edit and the reader always looks for exactly what the writer wrote. Concepts
that highdicom's templates fix themselves (e.g. "Tracking Identifier", "Algorithm Name") are not
repeated here.

Model output classes carry FHIR-style coding systems (``http://snomed.info/sct``) in the model card;
`coded_concept` maps them to DICOM coding scheme designators (``SCT``) so a class becomes an SR code.
"""
from __future__ import annotations

from types import MappingProxyType

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "ALGORITHM_GROUP_TRACKING_IDENTIFIER",
    "AREA_UNIT",
    "CALIBRATION_COMMENT",
    "CALIBRATION_PREFIX",
    "INDETERMINATE_COMMENT",
    "INDETERMINATE_FINDING",
    "INDETERMINATE_NAME",
    "INDETERMINATE_PREFIX",
    "UNCERTAINTY_COMMENT",
    "UNCERTAINTY_PREFIX",
    "LESION_AREA",
    "LESION_CENTER",
    "LESION_CENTROID_COMMENT",
    "LESION_EXTENT",
    "LESION_CENTROID_PREFIX",
    "LESION_TRACKING_PREFIX",
    "LESION_VOLUME",
    "VOLUME_UNIT",
    "DOCUMENT_TITLE",
    "FINDING_EVALUATION",
    "IMAGE_ONLY_COMMENT",
    "IMAGE_ONLY_PREFIX",
    "OBSERVER_TYPE_DEVICE",
    "PROBABILITY_UNIT",
    "PROCEDURE_REPORTED",
    "SALIENCY_IMAGE",
    "SCHEME_BY_SYSTEM",
    "SYSTEM_BY_SCHEME",
    "TIMELINE_DRIVER_COMMENT",
    "TIMELINE_DRIVER_PREFIX",
    "REVIEW_COMMENT",
    "REVIEW_DECISION_PREFIX",
    "REVIEW_COMMENT_PREFIX",
    "coded_concept",
    "fhir_system",
]

#: Title of the SR document (CID 7021 "Measurement Report Document Titles").
DOCUMENT_TITLE: Code = codes.cid7021.ImagingMeasurementReport

#: TID 1500 "Procedure Reported" (CID 100): the report is about an imaging procedure as a whole.
PROCEDURE_REPORTED: Code = Code("363679005", "SCT", "Imaging procedure")

#: TID 1002 "Observer Type": the observer is the model (a device), not a person.
OBSERVER_TYPE_DEVICE: Code = codes.cid270.Device

#: Unit of every class probability: a dimensionless ratio in [0, 1] (UCUM "1").
PROBABILITY_UNIT: Code = codes.UCUM.NoUnits

#: Concept name of the qualitative evaluation that carries the predicted class.
#: Deliberately *not* (121071, DCM, "Finding"): TID 1501 already uses that concept for the group's
#: finding type, and highdicom's `get_qualitative_evaluations()` filters it out, so an evaluation
#: named "Finding" would be written but never read back (docs/architecture.md, "Pitfalls met").
FINDING_EVALUATION: Code = Code("404684003", "SCT", "Clinical finding")

#: Concept name of the TEXT item that flags an image-only prediction (EHR timeline not used).
IMAGE_ONLY_COMMENT: Code = codes.DCM.Comment

#: The image-only TEXT item's value starts with this; the reason follows after ": ".
IMAGE_ONLY_PREFIX = "EHR timeline not used"

#: Concept name of the TEXT items naming the EHR timeline features that drove the prediction (same
#: concept as the image-only flag; the value's prefix tells them apart).
TIMELINE_DRIVER_COMMENT: Code = codes.DCM.Comment

#: A timeline-driver TEXT item's value starts with this; "name +0.123 toward <class>" follows after ": ".
TIMELINE_DRIVER_PREFIX = "EHR timeline driver"

#: Concept name of the TEXT items a clinician's review adds to a verified SR (README "Review"): the decision
#: (the model's finding confirmed, or changed with the model's output kept) and the reviewer's comment.
REVIEW_COMMENT: Code = codes.DCM.Comment

#: The review decision's TEXT value starts with this; e.g. "confirmed malignant" or "changed from …".
REVIEW_DECISION_PREFIX = "Clinical review"

#: The reviewer's comment TEXT value starts with this.
REVIEW_COMMENT_PREFIX = "Reviewer comment"

#: The finding when the model's calibrated probability lies in its card's indeterminate band: no class is
#: decided (SNOMED CT 82334004 |Indeterminate (qualifier value)|; the model card's INDETERMINATE and
#: fhir/codes.py name the same code). It is the SR's finding type and evaluation instead of a class.
INDETERMINATE_FINDING: Code = Code("82334004", "SCT", "Indeterminate")
#: The finding's name in a result, the ledger and the API (the model card's INDETERMINATE class name).
INDETERMINATE_NAME = "indeterminate"

#: Concept name of the TEXT item saying why the finding is indeterminate (its value starts with the prefix).
INDETERMINATE_COMMENT: Code = codes.DCM.Comment
INDETERMINATE_PREFIX = "Indeterminate"

#: Concept name of the TEXT item naming how the class probabilities were calibrated (the model card's
#: `[calibration]`), placed next to the algorithm name and version; its value starts with the prefix.
CALIBRATION_COMMENT: Code = codes.DCM.Comment
CALIBRATION_PREFIX = "Probability calibration"
#: An ensemble model's agreement: how many networks were averaged and the spread of their calibrated
#: probabilities (model card `[ensemble]`; absent for a single network).
UNCERTAINTY_COMMENT: Code = codes.DCM.Comment
UNCERTAINTY_PREFIX = "Ensemble uncertainty"

#: Concept name of the IMAGE item that references the Grad-CAM Secondary Capture (DCM 130404).
SALIENCY_IMAGE: Code = Code("130404", "DCM", "Saliency")

#: Human-readable TID 4108 tracking identifier of the one measurement group the SR holds.
ALGORITHM_GROUP_TRACKING_IDENTIFIER = "AI classification"

#: FHIR coding system URI -> DICOM coding scheme designator (PS3.16 Section 8).
SCHEME_BY_SYSTEM: MappingProxyType[str, str] = MappingProxyType(
    {
        "http://snomed.info/sct": "SCT",
        "http://loinc.org": "LN",
        "http://dicom.nema.org/resources/ontology/DCM": "DCM",
        "http://unitsofmeasure.org": "UCUM",
        "http://radlex.org": "RADLEX",
        "http://hl7.org/fhir/sid/icd-10": "I10",
        "http://hl7.org/fhir/sid/icd-10-cm": "I10C",
    }
)

#: DICOM coding scheme designator -> FHIR coding system URI (inverse of `SCHEME_BY_SYSTEM`).
SYSTEM_BY_SCHEME: MappingProxyType[str, str] = MappingProxyType(
    {scheme: system for system, scheme in SCHEME_BY_SYSTEM.items()} | {"SRT": "http://snomed.info/sct"}
)


def _scheme_for(system: str) -> str:
    if not isinstance(system, str):
        raise TypeError(f'Coding system must be a str, got {type(system).__name__}.')
    if system in SCHEME_BY_SYSTEM:
        return SCHEME_BY_SYSTEM[system]
    if system in SYSTEM_BY_SCHEME:  # already a DICOM designator, e.g. "SCT"
        return "SCT" if system == "SRT" else system
    known = ", ".join(sorted(SCHEME_BY_SYSTEM))
    raise ValueError(
        f'Coding system "{system}" has no DICOM coding scheme designator; use one of: {known} '
        "(set the class system in the model card)."
    )


def coded_concept(system: str, code: str, display: str) -> CodedConcept:
    """Return the SR code for a model output class given with a FHIR coding system.

    Raises:
        TypeError: if an argument is not a str.
        ValueError: if the system is unknown, or the code or display is empty.
    """
    for label, value in (("code", code), ("display", display)):
        if not isinstance(value, str):
            raise TypeError(f'Class {label} must be a str, got {type(value).__name__}.')
        if not value.strip():
            raise ValueError(f"Class {label} must not be empty (system {system!r}, code {code!r}).")
    return CodedConcept(value=code, scheme_designator=_scheme_for(system), meaning=display)


def fhir_system(scheme_designator: str) -> str:
    """Return the FHIR coding system URI for a DICOM coding scheme designator (``SCT`` -> SNOMED CT).

    Raises:
        ValueError: if the designator is not one the SR emits.
    """
    try:
        return SYSTEM_BY_SCHEME[scheme_designator]
    except KeyError:
        raise ValueError(
            f'Coding scheme designator "{scheme_designator}" has no known FHIR coding system.'
        ) from None


# --- lesion segmentation (service/outputs/seg/build.py): the SR's TID 1410/1411 measurement group per lesion -------

#: Concept name of the lesion size NUM item: area of a 2D segmentation, volume of a 3D one.
LESION_AREA: Code = codes.SCT.Area
LESION_VOLUME: Code = codes.SCT.Volume
AREA_UNIT: Code = codes.UCUM.SquareMillimeter
VOLUME_UNIT: Code = codes.UCUM.CubicMillimeter

#: TID 4108 tracking identifier of a lesion (segment): "Lesion 1".
LESION_TRACKING_PREFIX = "Lesion"

#: TEXT item of the lesion group holding its centroid in source pixel coordinates.
LESION_CENTROID_COMMENT: Code = codes.DCM.Comment

#: SCOORD POINT of a 2D lesion's centroid on its source image (DCM 111010 "Center").
LESION_CENTER: Code = Code("111010", "DCM", "Center")

#: SCOORD closed POLYLINE of a 2D lesion's bounding box on its source image (DCM 111030 "Image Region").
LESION_EXTENT: Code = Code("111030", "DCM", "Image Region")
LESION_CENTROID_PREFIX = "Lesion centroid"
