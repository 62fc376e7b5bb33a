"""What a job knows of its study, and the glue between the libraries: DICOM header → study facts and
patient identifier, model result → FHIR report content.

``inference/`` and ``fhir/`` do not know each other; this is the one place that translates.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread

from dicom_fusion.service.config import FhirSettings

if TYPE_CHECKING:
    from dicom_fusion.fhir.report import ReportContent
    from dicom_fusion.inference.serve.predict import InferenceResult

@dataclass(frozen=True)
class StudyFacts:
    """What later stages need from the DICOM header; saved in the job folder (PHI stays in the spool)."""

    study_uid: str
    study_time: str  # ISO 8601, UTC
    patient_id: str
    issuer: str
    accession_number: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyFacts:
        return cls(**{k: str(data.get(k, "")) for k in cls.__dataclass_fields__})

    @property
    def time(self) -> datetime:
        return datetime.fromisoformat(self.study_time)


def _dicom_datetime(date: str, time: str) -> datetime:
    """StudyDate/StudyTime → aware UTC datetime (DICOM times carry no zone; we treat them as UTC)."""
    date = (date or "").strip()
    if len(date) != 8 or not date.isdigit():
        return datetime.now(UTC).replace(microsecond=0)
    t = (time or "").strip().split(".")[0].ljust(6, "0")[:6]
    if not t.isdigit():
        t = "000000"
    return datetime.strptime(date + t, "%Y%m%d%H%M%S").replace(tzinfo=UTC)


def study_facts(path: Path) -> StudyFacts:
    ds = dcmread(path, stop_before_pixels=True)
    when = _dicom_datetime(str(ds.get("StudyDate", "")), str(ds.get("StudyTime", "")))
    return StudyFacts(
        study_uid=str(ds.StudyInstanceUID),
        study_time=when.isoformat(),
        patient_id=str(ds.get("PatientID", "") or "").strip(),
        issuer=str(ds.get("IssuerOfPatientID", "") or "").strip(),
        accession_number=str(ds.get("AccessionNumber", "") or "").strip(),
    )


def identifier_system(fhir: FhirSettings, issuer: str) -> str:
    """FHIR identifier system for a DICOM IssuerOfPatientID.

    Rules, in order: an explicit ``fhir.issuer_systems`` entry; an issuer that already is a URI
    (``urn:``, ``http(s)://``); otherwise ``fhir.default_identifier_system``.
    """
    if issuer and issuer in fhir.issuer_systems:
        return fhir.issuer_systems[issuer]
    if issuer.startswith(("urn:", "http://", "https://")):
        return issuer
    return fhir.default_identifier_system


def report_content(result: InferenceResult, facts: StudyFacts, *, sr_uid: str, patient_id: str | None,
                   system: str) -> ReportContent:
    from dicom_fusion.fhir.report import ReportContent, ReportFinding

    def finding(p: Any) -> ReportFinding:
        return ReportFinding(code=p.code, system=p.system, display=p.display, probability=p.probability)

    return ReportContent(
        identifier=sr_uid,
        patient_id=patient_id,
        patient_identifier=(system, facts.patient_id) if facts.patient_id else None,
        study_instance_uid=facts.study_uid,
        accession_number=facts.accession_number or None,
        effective=facts.time,
        model_name=result.model_name,
        model_version=result.model_version,
        probabilities=tuple(finding(p) for p in result.probabilities),
        finding=finding(result.finding),
        image_only=result.image_only,
        image_only_reason=result.image_only_reason,
        drivers=result.driver_lines(),
    )
