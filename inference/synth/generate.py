"""Synthetic cohort: DX studies + FHIR R4 EHR bundles with a label that both branches carry part of.

Each patient has two independent latent scores, one expressed in the image (lesion size, border
irregularity and texture) and one in the EHR (lab trends toward the study, more conditions and
medications). The label is a noisy threshold on their sum (~30 % positive), so either branch alone is
informative but fusing both is measurably better: the property the demo and the model tests rely on.

Everything is derived from (seed, patient index): UIDs via `generate_uid(entropy_srcs=...)`, FHIR ids
like `Patient/syn00001` written with PUT, so regenerating or reloading a cohort is idempotent and a
patient does not change when the cohort grows.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from rich.console import Console
from rich.progress import track

from dicom_fusion.inference.card.model import DEFAULT_TIMELINE, SNOMED

MRN_SYSTEM = "urn:dicom-fusion:synthetic-mrn"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
IMAGE_SIZE = 256
MASK_NAME = "mask.npy"
POSITIVE_THRESHOLD = 0.94  # on 1.2 z_img + 1.2 z_ehr + N(0, 0.6²): P(positive) ≈ 0.30
REFERENCE_DATE = datetime(2025, 6, 30, tzinfo=UTC)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# Lab/vital generators keyed by the default card's feature names (codes and units come from the card):
# display, category, baseline, per-patient spread, label-driven trend at the study, noise, missing rate.
LABS: dict[str, tuple[str, str, float, float, float, float, float]] = {
    "glucose": ("Glucose [Mass/volume] in Serum or Plasma", "laboratory", 100.0, 10.0, 22.0, 8.0, 0.3),
    "hba1c": ("Hemoglobin A1c/Hemoglobin.total in Blood", "laboratory", 5.6, 0.4, 0.7, 0.15, 0.5),
    "crp": ("C reactive protein [Mass/volume] in Serum or Plasma", "laboratory", 1.1, 0.5, 0.8, 0.3, 0.5),
    "bmi": ("Body mass index (BMI) [Ratio]", "vital-signs", 27.0, 4.0, 1.0, 0.4, 0.2),
    "systolic_bp": ("Systolic blood pressure", "vital-signs", 125.0, 10.0, 8.0, 8.0, 0.1),
}
LOG_SCALE = {"crp"}  # generated in log space: CRP is right-skewed
CONDITIONS = (  # SNOMED CT code, display, RxNorm code and ingredient of a typical medication
    ("44054006", "Diabetes mellitus type 2", "6809", "metformin"),
    ("38341003", "Hypertensive disorder, systemic arterial", "29046", "lisinopril"),
    ("55822004", "Hyperlipidemia", "83367", "atorvastatin"),
    ("13645005", "Chronic obstructive lung disease", "69120", "tiotropium"),
    ("195967001", "Asthma", "435", "albuterol"),
    ("235595009", "Gastroesophageal reflux disease", "7646", "omeprazole"),
)
BODY_PARTS = {"CHEST": ("51185008", "Thorax"), "SKIN": ("39937001", "Skin structure")}
VIEWS = {"PA": ("399348003", "postero-anterior"), "LL": ("399173006", "left lateral")}


@dataclass(frozen=True)
class SyntheticPatient:
    """One generated patient; `image_score` / `ehr_score` are the latent drivers of each branch."""

    patient_id: str  # DICOM PatientID == FHIR Patient.identifier value
    fhir_id: str  # Patient resource id
    label: int  # 1 = positive class
    study_instance_uid: str
    study_time: datetime  # tz-aware (UTC)
    study_dir: Path
    bundle_path: Path
    image_score: float
    ehr_score: float
    lesion: tuple[float, float, float] = (0.5, 0.5, 0.0)
    """Planted lesion in the first image (the one the model reads): centre row, centre column and mean
    radius, as fractions of the image height/width; ground truth for checking Grad-CAM."""
    mask_path: Path | None = None
    """`mask.npy`: the planted lesion's exact binary mask (see `generate_patient`)."""


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _ts(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


# --------------------------------------------------------------------------- images


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, body_part: str) -> np.ndarray:
    """A body-like smooth field plus low-frequency structure, in 12-bit units."""
    if body_part == "CHEST":
        body = 700.0 + 1300.0 * np.exp(-((xx**2 / 0.55 + yy**2 / 0.8) ** 2))
        lungs = -450.0 * (np.exp(-(((np.abs(xx) - 0.38) / 0.2) ** 2 + (yy / 0.5) ** 2)))
        base = body + lungs
    else:
        base = 1500.0 + 150.0 * xx + 100.0 * yy
    for _ in range(4):
        fx, fy = rng.uniform(1.0, 5.0, size=2)
        base = base + rng.uniform(15, 50) * np.sin(
            math.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * math.pi)
        )
    return np.asarray(base, dtype=np.float64)


def lesion_radius(z: float) -> float:
    """Mean lesion radius for image score z, in the [-1, 1] image coordinates of `synth_image`."""
    return float(np.clip(0.11 + 0.045 * z, 0.04, 0.25))


def _lesion(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, z: float, centre: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """A blob whose radius, border irregularity and internal texture grow with the latent score z;
    returns the intensity field and the binary lesion mask (soft mask >= 0.5)."""
    dy, dx = yy - centre[0], xx - centre[1]
    dist = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    radius = lesion_radius(z)
    irregularity = 0.05 + 0.35 * _sigmoid(2.0 * z)
    border = np.ones_like(theta)
    for k in (3, 5, 7, 11):
        border += irregularity / 2.0 * rng.uniform(0.3, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    edge = 0.004 + 0.012 * _sigmoid(z)
    inside = 1.0 / (1.0 + np.exp(np.clip((dist - radius * border) / edge, -50, 50)))
    texture = rng.normal(0.0, 20.0 + 120.0 * _sigmoid(1.5 * z), size=dist.shape)
    field: np.ndarray = inside * (max(80.0, 300.0 + 110.0 * z) + texture)
    return field, inside >= 0.5


def synth_image(
    rng: np.random.Generator, z: float, body_part: str, centre: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """One 256x256 uint16 (12 bits stored) radiograph-like image carrying the image latent score, and
    the planted lesion's binary mask (ground truth for Grad-CAM checks and segmentation)."""
    axis = np.linspace(-1.0, 1.0, IMAGE_SIZE)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    background = _background(rng, yy, xx, body_part)  # drawn before the lesion: same cohort as before masks
    field, mask = _lesion(rng, yy, xx, z, centre)
    image = background + field
    image += rng.normal(0.0, 25.0, size=image.shape)
    out: np.ndarray = np.clip(np.rint(image), 0, 4095).astype(np.uint16)
    return out, mask.astype(np.uint8)


CT_SHAPE = (32, 96, 96)  # slices, rows, columns of the small CT volume option
CT_SPACING = (3.0, 2.0, 2.0)  # mm: slice thickness/spacing, row and column pixel spacing


def synth_volume(
    rng: np.random.Generator, z: float, centre: tuple[float, float, float], radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """A small chest CT (int16 HU, CT_SHAPE) with a lung nodule carrying the image latent score, and its
    binary mask. Same story as `synth_image`: size, border irregularity and internal heterogeneity grow
    with z."""
    zz, yy, xx = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in CT_SHAPE), indexing="ij")
    body = (xx / 0.85) ** 2 + (yy / 0.62) ** 2 < 1.0
    lungs = ((np.abs(xx) - 0.4) / 0.3) ** 2 + (yy / 0.45) ** 2 + (zz / 1.3) ** 2 < 1.0
    hu = np.where(body, 40.0, -1000.0) + np.where(lungs, -840.0, 0.0)
    dz, dy, dx = zz - centre[0], yy - centre[1], xx - centre[2]
    dist = np.sqrt((dz * 0.6) ** 2 + dy**2 + dx**2)  # slices are 1.5x thicker than pixels are wide
    theta, phi = np.arctan2(dy, dx), np.arctan2(dz * 0.6, np.hypot(dy, dx))
    irregularity = 0.05 + 0.35 * _sigmoid(2.0 * z)
    border = np.ones_like(theta)
    for k in (3, 5, 7):
        border += (irregularity / 2.0 * rng.uniform(0.3, 1.0)
                   * np.cos(k * theta + rng.uniform(0, 2 * math.pi)) * np.cos((k - 2) * phi))
    inside = 1.0 / (1.0 + np.exp(np.clip((dist - radius * border) / 0.02, -50, 50)))
    texture = rng.normal(0.0, 20.0 + 120.0 * _sigmoid(1.5 * z), size=dist.shape)
    hu = hu + inside * (840.0 + 60.0 * z + texture) + rng.normal(0.0, 20.0, size=dist.shape)
    out: np.ndarray = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return out, (inside >= 0.5).astype(np.uint8)


def _sct(code: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "SCT", meaning
    return item


def _identity(ds: Dataset, patient: dict[str, Any]) -> None:
    """Patient, study, series and equipment attributes every synthetic instance shares."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.TimezoneOffsetFromUTC = "+0000"
    ds.AccessionNumber = patient["accession"]
    ds.Manufacturer = "dicom-fusion"
    ds.ManufacturerModelName = "synthetic cohort"
    ds.InstitutionName = "Synthetic General Hospital"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient["dicom_name"]
    ds.PatientID = patient["patient_id"]
    ds.IssuerOfPatientID = MRN_SYSTEM
    ds.PatientBirthDate = patient["birth_date"].strftime("%Y%m%d")
    ds.PatientSex = patient["sex"]
    ds.StudyInstanceUID = patient["study_uid"]
    ds.SeriesInstanceUID = patient["series_uid"]
    ds.StudyID = "1"


def _dx_dataset(patient: dict[str, Any], pixels: np.ndarray, number: int, view: str) -> Dataset:
    ds = Dataset()
    _identity(ds, patient)
    when: datetime = patient["study_time"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[*patient["entropy"], "instance", str(number)])
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = when.strftime("%H%M%S")
    ds.ContentTime = ds.InstanceCreationTime = (when + timedelta(seconds=20 * number)).strftime("%H%M%S")
    ds.AcquisitionDateTime = (when + timedelta(seconds=20 * number)).strftime("%Y%m%d%H%M%S")
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.StudyDescription = f"XR {patient['body_part']}"
    ds.SeriesDescription = f"XR {patient['body_part']} {view}"
    ds.BodyPartExamined = patient["body_part"]
    ds.AnatomicRegionSequence = DicomSequence([_sct(*BODY_PARTS[patient["body_part"]])])
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.ViewPosition = view
    ds.ViewCodeSequence = DicomSequence([_sct(*VIEWS[view])])
    ds.PositionerType = "COLUMN"
    ds.ImageLaterality = "U"
    ds.PatientOrientation = ["L", "F"] if view == "PA" else ["A", "F"]
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = ds.PixelSpacing = ["0.15", "0.15"]
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = number
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = pixels.tobytes()
    return ds


def _ct_dataset(patient: dict[str, Any], pixels: np.ndarray, number: int) -> Dataset:
    """One axial CT slice (uint16 stored, HU = value - 1024), slices ascending in z with InstanceNumber."""
    ds = Dataset()
    _identity(ds, patient)
    when: datetime = patient["study_time"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[*patient["entropy"], "instance", str(number)])
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = when.strftime("%H%M%S")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.Modality = "CT"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = "CT CHEST AXIAL 3 mm"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[*patient["entropy"], "frame-of-reference"])
    ds.PositionReferenceIndicator = ""
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    ds.KVP = "120"
    ds.SliceThickness = ds.SpacingBetweenSlices = str(CT_SPACING[0])
    ds.PixelSpacing = [str(CT_SPACING[1]), str(CT_SPACING[2])]
    rows, cols = pixels.shape
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [
        -CT_SPACING[2] * (cols - 1) / 2, -CT_SPACING[1] * (rows - 1) / 2, CT_SPACING[0] * (number - 1) - 45.0
    ]
    ds.SliceLocation = str(ds.ImagePositionPatient[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "-600", "1500"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = (pixels.astype(np.int32) + 1024).astype(np.uint16).tobytes()
    return ds


def _write_dicom(ds: Dataset, path: Path, transfer_syntax: UID) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DFUSION_SYNTH"
    ds.file_meta = meta
    if transfer_syntax in UNCOMPRESSED:
        meta.TransferSyntaxUID = transfer_syntax
    else:  # RLE Lossless, JPEG-LS Lossless, JPEG 2000 Lossless: whatever pydicom has an encoder for
        ds.compress(transfer_syntax, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------- FHIR bundle


def _ref(rtype: str, rid: str) -> dict[str, str]:
    return {"reference": f"{rtype}/{rid}"}


def _put(resource: dict[str, Any]) -> dict[str, Any]:
    return {
        "resource": resource,
        "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
    }


def _coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _ehr_resources(rng: np.random.Generator, p: dict[str, Any], z: float) -> Iterable[dict[str, Any]]:
    """Encounters with labs/vitals over ~2 years, conditions and medications, driven by the EHR score z."""
    pid, study_time = p["fhir_id"], p["study_time"]
    features = {f.name: f for f in DEFAULT_TIMELINE.features}
    offsets = {name: rng.normal() for name in LABS}  # patient baseline: a nuisance, unrelated to the label
    n_visits = int(rng.poisson(7)) + 1
    # Visits from 1 day to window + 40 days back: a few fall outside the model's window on purpose.
    ages = np.sort(rng.uniform(1.0, DEFAULT_TIMELINE.window_days + 40.0, size=n_visits))[::-1]
    for v, age in enumerate(ages, start=1):
        start = study_time - timedelta(days=float(age))
        start = start.replace(hour=int(rng.integers(8, 17)), minute=int(rng.integers(0, 60)), second=0)
        eid = f"{pid}-enc-{v:02d}"
        yield {
            "resourceType": "Encounter",
            "id": eid,
            "status": "finished",
            "class": {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": "AMB",
                "display": "ambulatory",
            },
            "type": [_coding(SNOMED, "185349003", "Encounter for check up")],
            "subject": _ref("Patient", pid),
            "period": {"start": _ts(start), "end": _ts(start + timedelta(minutes=int(rng.integers(15, 90))))},
        }
        progress = max(0.0, 1.0 - age / DEFAULT_TIMELINE.window_days)  # 0 two years back -> 1 at the study
        for name, (display, category, base, spread, trend, noise, missing) in LABS.items():
            if rng.random() < missing:
                continue
            value = base + spread * offsets[name] + trend * z * progress + rng.normal(0.0, noise)
            value = math.exp(value) if name in LOG_SCALE else value
            f = features[name]
            yield {
                "resourceType": "Observation",
                "id": f"{pid}-obs-{v:02d}-{name.replace('_', '-')}",
                "status": "final",
                "category": [_coding(OBS_CATEGORY, category, category.replace("-", " ").title())],
                "code": _coding(f.system, f.code, display),
                "subject": _ref("Patient", pid),
                "encounter": _ref("Encounter", eid),
                "effectiveDateTime": _ts(start + timedelta(minutes=10)),
                "valueQuantity": {"value": round(value, 2), "unit": f.unit, "system": UCUM, "code": f.unit},
            }
    n_conditions = min(len(CONDITIONS), int(rng.poisson(0.6 + 1.8 * _sigmoid(1.5 * z))))
    for c, idx in enumerate(rng.choice(len(CONDITIONS), size=n_conditions, replace=False), start=1):
        code, display, rx_code, rx_name = CONDITIONS[int(idx)]
        onset = study_time - timedelta(days=float(rng.uniform(5.0, 900.0)))
        yield {
            "resourceType": "Condition",
            "id": f"{pid}-cond-{c:02d}",
            "clinicalStatus": _coding(
                "http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"
            ),
            "verificationStatus": _coding(
                "http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed"
            ),
            "category": [
                _coding(
                    "http://terminology.hl7.org/CodeSystem/condition-category",
                    "problem-list-item",
                    "Problem List Item",
                )
            ],
            "code": _coding(SNOMED, code, display),
            "subject": _ref("Patient", pid),
            "onsetDateTime": _ts(onset),
            "recordedDate": _ts(onset + timedelta(days=1)),
        }
        if rng.random() < 0.75:
            authored = onset + timedelta(days=float(rng.uniform(1.0, 30.0)))
            if authored < study_time:
                yield {
                    "resourceType": "MedicationRequest",
                    "id": f"{pid}-med-{c:02d}",
                    "status": "active",
                    "intent": "order",
                    "medicationCodeableConcept": _coding(RXNORM, rx_code, rx_name),
                    "subject": _ref("Patient", pid),
                    "authoredOn": _ts(authored),
                }


def _bundle(rng: np.random.Generator, p: dict[str, Any], z: float) -> dict[str, Any]:
    patient = {
        "resourceType": "Patient",
        "id": p["fhir_id"],
        "identifier": [
            {
                "type": _coding(
                    "http://terminology.hl7.org/CodeSystem/v2-0203", "MR", "Medical record number"
                ),
                "system": MRN_SYSTEM,
                "value": p["patient_id"],
            }
        ],
        "name": [{"family": "SYNTH", "given": [p["given"]]}],
        "gender": "male" if p["sex"] == "M" else "female",
        "birthDate": p["birth_date"].isoformat(),
    }
    entries = [_put(patient), *(_put(r) for r in _ehr_resources(rng, p, z))]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


# --------------------------------------------------------------------------- cohort


MODALITIES = ("DX", "CT")


def generate_patient(
    index: int, out_dir: Path, seed: int, *, transfer_syntax: str = ExplicitVRLittleEndian,
    modality: str = "DX",
) -> SyntheticPatient:
    """Generate patient number `index` (1-based) of the cohort `seed` into `out_dir/<PatientID>/`:
    `study/*.dcm`, `bundle.json` and `mask.npy`, the binary lesion mask of what the model reads (DX:
    the first image, [rows, cols]; CT: the volume, [slices, rows, cols] in InstanceNumber order, which
    is ascending slice position)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    rng = np.random.default_rng([seed, index])
    z_img, z_ehr = (float(v) for v in rng.normal(size=2))
    label = int(1.2 * z_img + 1.2 * z_ehr + rng.normal(0.0, 0.6) > POSITIVE_THRESHOLD)
    patient_id, fhir_id = f"SYN{index:05d}", f"syn{index:05d}"
    entropy = ["dicom-fusion-synth", str(seed), patient_id]
    study_time = (REFERENCE_DATE - timedelta(days=int(rng.integers(0, 365)))).replace(
        hour=int(rng.integers(7, 19)), minute=int(rng.integers(0, 60)), second=int(rng.integers(0, 60))
    )
    p: dict[str, Any] = {
        "patient_id": patient_id,
        "fhir_id": fhir_id,
        "given": f"PATIENT{index:04d}",
        "dicom_name": f"SYNTH^PATIENT{index:04d}",
        "entropy": entropy,
        "study_time": study_time,
        "sex": "M" if rng.random() < 0.5 else "F",
        "birth_date": date(
            study_time.year - int(rng.integers(35, 86)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
        ),
        "body_part": "CHEST" if rng.random() < 0.7 or modality == "CT" else "SKIN",
        "accession": f"A{seed % 1000:03d}{index:06d}",
        "study_uid": generate_uid(entropy_srcs=[*entropy, "study"]),
        "series_uid": generate_uid(entropy_srcs=[*entropy, "series"]),
    }
    patient_dir = Path(out_dir) / patient_id
    study_dir = patient_dir / "study"
    study_dir.mkdir(parents=True, exist_ok=True)
    radius = lesion_radius(z_img)
    if modality == "CT":
        side = 1.0 if rng.random() < 0.5 else -1.0
        centre3 = (float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.2, 0.2)),
                   side * 0.4 + float(rng.uniform(-0.1, 0.1)))
        volume, mask = synth_volume(rng, z_img, centre3, radius)
        for number, pixels in enumerate(volume, start=1):
            _write_dicom(_ct_dataset(p, pixels, number), study_dir / f"IM{number:04d}.dcm", UID(transfer_syntax))
        centre = centre3[1:]
    else:
        centre = (float(rng.uniform(-0.35, 0.35)), float(rng.uniform(-0.45, 0.45)))
        views = ["PA"] if rng.random() < 0.5 else ["PA", "LL"]
        masks = []
        for number, view in enumerate(views, start=1):
            shifted = (centre[0] + 0.03 * (number - 1), centre[1] * (1.0 if number == 1 else 0.4))
            pixels, view_mask = synth_image(rng, z_img, p["body_part"], shifted)
            masks.append(view_mask)
            _write_dicom(
                _dx_dataset(p, pixels, number, view), study_dir / f"IM{number:04d}.dcm", UID(transfer_syntax)
            )
        mask = masks[0]  # the model reads the first view (transforms.decode_series: middle by number)
    np.save(patient_dir / MASK_NAME, mask)
    bundle_path = patient_dir / "bundle.json"
    bundle_path.write_text(json.dumps(_bundle(rng, p, z_ehr), indent=1), encoding="utf-8")
    return SyntheticPatient(
        patient_id=patient_id,
        fhir_id=fhir_id,
        label=label,
        study_instance_uid=p["study_uid"],
        study_time=study_time,
        study_dir=study_dir,
        bundle_path=bundle_path,
        image_score=z_img,
        ehr_score=z_ehr,
        lesion=((centre[0] + 1.0) / 2.0, (centre[1] + 1.0) / 2.0, radius / 2.0),
        mask_path=patient_dir / MASK_NAME,
    )


def generate_cohort(
    n_patients: int,
    out_dir: Path,
    seed: int,
    progress: bool = True,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    modality: str = "DX",
) -> list[SyntheticPatient]:
    """Write `n_patients` patients and `out_dir/cohort.csv` (patient_id, label, study_uid, study_time,
    lesion_row, lesion_col, lesion_radius: the planted lesion in image fractions, see SyntheticPatient;
    mask: the lesion mask file relative to `out_dir`).

    `transfer_syntax` (default Explicit VR Little Endian) may name any syntax pydicom can encode here
    (Implicit VR LE, RLE Lossless, JPEG-LS Lossless, JPEG 2000 Lossless), for decoder tests.
    `modality` "DX" writes 1-2 radiographs per study, "CT" a small chest CT volume (CT_SHAPE).
    """
    if n_patients < 1:
        raise ValueError(f"n_patients must be at least 1, got {n_patients}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    patients = [
        generate_patient(i, out_dir, seed, transfer_syntax=transfer_syntax, modality=modality)
        for i in track(
            range(1, n_patients + 1),
            description="Synthesising patients",
            total=n_patients,
            disable=not progress,
            console=Console(stderr=True),
            transient=True,
        )
    ]
    with open(out_dir / "cohort.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["patient_id", "label", "study_uid", "study_time", "lesion_row", "lesion_col", "lesion_radius", "mask"]
        )
        for sp in patients:
            lesion = (f"{v:.4f}" for v in sp.lesion)
            mask = f"{sp.patient_id}/{MASK_NAME}"
            writer.writerow([sp.patient_id, sp.label, sp.study_instance_uid, _ts(sp.study_time), *lesion, mask])
    return patients


__all__ = [
    "MASK_NAME",
    "MODALITIES",
    "MRN_SYSTEM",
    "SyntheticPatient",
    "generate_cohort",
    "generate_patient",
    "synth_image",
    "synth_volume",
]
