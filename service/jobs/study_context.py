"""What a job knows of its study, and the glue between the libraries: DICOM header → study facts and
patient identifier, model result → FHIR report content.

``inference/`` and ``fhir/`` do not know each other; this is the one place that translates.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread

from dicom_fusion.service.config import FhirSettings
from dicom_fusion.service.errors import PermanentError
from dicom_fusion.service.outputs.sr.build import SrVerification, review_lines
from dicom_fusion.service.storage.models import Review

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


def reviewed_result(result: InferenceResult, review: Review | None) -> tuple[InferenceResult, Any]:
    """The result as the outputs report it after a review, and the model's own finding when the reviewer
    chose another class (None when kept). The class probabilities stay the model's."""
    if review is None or not review.finding_code or review.finding_code == result.finding.name:
        return result, None
    chosen = next((p for p in result.probabilities if p.name == review.finding_code), None)
    if chosen is None:  # the API checks the class against result.json; a changed result.json cannot help
        raise PermanentError(f"the reviewer's finding {review.finding_code!r} is not a class of "
                             f"{result.model_name} {result.model_version}; reject and replay the study")
    return dataclasses.replace(result, finding=chosen), result.finding


def verification(review: Review, model_finding: Any, organization: str) -> SrVerification:
    """The SR's verification of an approved result; the ledger keeps times in naive UTC."""
    at = review.at if review.at.tzinfo else review.at.replace(tzinfo=UTC)
    return SrVerification(observer_name=review.reviewer, organization=organization, at=at,
                          comment=review.comment, model_finding=model_finding)


def report_content(result: InferenceResult, facts: StudyFacts, *, sr_uid: str, patient_id: str | None,
                   system: str, status: str = "final", verified: SrVerification | None = None) -> ReportContent:
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
        status=status,
        interpreter=verified.observer_name if verified else None,
        review=tuple(review_lines(verified, result)) if verified else (),
        calibration=getattr(result, "calibration", ""),
        uncertainty=getattr(result, "uncertainty", ""),
        indeterminate_reason=getattr(result, "indeterminate_reason", ""),
    )
