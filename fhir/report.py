"""The FHIR side of a result: a DiagnosticReport with one Observation per class probability and one for the
finding, posted as a transaction of conditional creates.

Why conditional creates: tasks are redelivered (worker killed, broker restored), so the same report is
posted more than once. Every resource carries a business identifier derived from the SR SOP Instance UID
(itself derived from study + model), and each entry is `ifNoneExist` on it, so a retry finds the
resources already there instead of duplicating them. The builder is pure (same content, same bundle,
apart from `issued`); looking things up on the server (the ImagingStudy) happens in `post_report`.
"""
from __future__ import annotations

import base64
import itertools
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from dicom_fusion.fhir import codes
from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.fhir.errors import FHIRError, OperationOutcomeError, ResourceNotFound

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Namespace of the deterministic urn:uuid identifiers and fullUrls derived from the SR UID.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicom-fusion:fhir:report")


#: The DiagnosticReport statuses a result goes through (its Observations take the same code).
REPORT_STATUSES = ("preliminary", "final", "entered-in-error")


@dataclass(frozen=True)
class ReportFinding:
    """One output class of the model with its probability (0..1), coded (SNOMED CT by default)."""

    code: str
    system: str
    display: str
    probability: float

    def __post_init__(self) -> None:
        if not self.code or not self.system:
            raise ValueError("ReportFinding needs a code and a code system (see the model card's classes)")
        if not 0.0 <= float(self.probability) <= 1.0:
            raise ValueError(f"ReportFinding.probability must be within 0..1, got {self.probability}")


@dataclass(frozen=True)
class ReportContent:
    """Everything the FHIR report says. `identifier` is the SR SOP Instance UID; the patient is referenced by
    server id when it was resolved, else logically by `patient_identifier` (system, value)."""

    identifier: str
    patient_id: str | None
    patient_identifier: tuple[str, str] | None
    study_instance_uid: str
    accession_number: str | None
    effective: datetime
    model_name: str
    model_version: str
    probabilities: tuple[ReportFinding, ...]
    finding: ReportFinding
    image_only: bool
    image_only_reason: str | None = None
    drivers: tuple[str, ...] = ()  # EHR timeline features that drove the prediction, one line each
    # preliminary (nobody reviewed it), final (a clinician approved it, or the site publishes AI output as
    # final) or entered-in-error (a reviewer rejected a preliminary report)
    status: str = "final"
    interpreter: str | None = None  # the reviewer's name (DiagnosticReport.resultsInterpreter)
    review: tuple[str, ...] = ()  # the review decision and comment, one line each
    calibration: str = ""  # how the probabilities were calibrated (the model card's method); "" = not
    uncertainty: str = ""  # an ensemble's agreement (networks averaged, spread); "" = a single network
    indeterminate_reason: str = ""  # why the finding is indeterminate (band or members' disagreement)

    @property
    def indeterminate(self) -> bool:
        """True when the finding is "indeterminate" (SNOMED CT 82334004): the model decided no class."""
        return (self.finding.system, self.finding.code) == (codes.SNOMED_CT, codes.INDETERMINATE_FINDING[0])

    def __post_init__(self) -> None:
        if self.status not in REPORT_STATUSES:
            raise ValueError(f"ReportContent.status must be one of {', '.join(REPORT_STATUSES)}, "
                             f"got {self.status!r}")
        for name in ("identifier", "study_instance_uid"):
            uid = getattr(self, name)
            if not _UID_RE.match(uid or "") or len(uid) > 64:
                raise ValueError(f"ReportContent.{name} must be a DICOM UID (digits and dots, <= 64 chars), "
                                 f"got {uid!r}")
        if self.effective.tzinfo is None:
            raise ValueError("ReportContent.effective must be timezone-aware; attach the site's timezone "
                             "(DICOM TimezoneOffsetFromUTC or the configured default) to the study time")
        if not self.probabilities:
            raise ValueError("ReportContent.probabilities is empty; pass one ReportFinding per model class")
        keys = [(p.system, p.code) for p in self.probabilities]
        if len(set(keys)) != len(keys):
            raise ValueError("ReportContent.probabilities has repeated class codes; "
                             "class codes must be unique")
        if not self.model_name or not self.model_version:
            raise ValueError("ReportContent needs model_name and model_version (from the model card)")


@dataclass(frozen=True)
class ReportOutcome:
    """Server id of the DiagnosticReport, whether this call created it (False: it already existed) and
    whether it changed an existing one's status (a new version of the same resource)."""

    report_id: str
    created: bool
    updated: bool = False


def report_identifier(content: ReportContent) -> tuple[str, str]:
    """(system, value) of the DiagnosticReport's business identifier: the SR UID as urn:oid."""
    return codes.DICOM_UID_SYSTEM, f"urn:oid:{content.identifier}"


def build_report_bundle(content: ReportContent, *, issued: datetime | None = None) -> dict[str, Any]:
    """A transaction Bundle: probability Observations, the finding Observation, then the DiagnosticReport.

    Every resource is validated with the `fhir.resources.R4B` models; a `ValueError` names the failing
    element path. `issued` defaults to now.
    """
    issued_at = (issued or datetime.now(UTC)).astimezone(UTC)
    common = _observation_common(content, issued_at)
    entries: list[dict[str, Any]] = []
    for p in content.probabilities:
        obs = {**common, "identifier": [_derived_identifier(content, "probability", p.system, p.code)],
               "code": _concept(p.system, p.code, p.display),
               "valueQuantity": {"value": round(float(p.probability), 6), "unit": codes.UCUM_UNITY,
                                 "system": codes.UCUM, "code": codes.UCUM_UNITY}}
        entries.append(_entry(content, "Observation", obs, "probability", p.system, p.code))
    f = content.finding
    finding_obs = {**common, "identifier": [_derived_identifier(content, "finding")],
                   "code": _concept(codes.DCM, *codes.FINDING_OBSERVATION_CODE),
                   "valueCodeableConcept": _concept(f.system, f.code, f.display)}
    entries.append(_entry(content, "Observation", finding_obs, "finding"))

    report = _diagnostic_report(content, issued_at, [e["fullUrl"] for e in entries])
    system, value = report_identifier(content)
    entries.append({"fullUrl": _urn(content, "report"), "resource": report,
                    "request": {"method": "POST", "url": "DiagnosticReport",
                                "ifNoneExist": _identifier_query(system, value)}})
    for entry in entries:
        validate_resource(entry["resource"])
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    _validate(bundle, "Bundle")
    return bundle


def post_report(client: FhirClient, content: ReportContent) -> ReportOutcome:
    """Post the report transaction; link the ImagingStudy when the server has one for this study.

    Safe to call again for the same content: the second call creates nothing and returns the existing
    report's id with `created=False`. When the server holds this report with another status (a preliminary
    report being approved or rejected), the same resources are updated instead — a new version of the
    same DiagnosticReport, never a second one — guarded by the version read (`If-Match`), so a concurrent
    change fails rather than being overwritten. `FHIRError`s propagate (`FHIRUnavailable` is retryable).
    """
    existing = _find_report(client, content)
    if existing is not None:
        if existing.get("status") == content.status:
            return ReportOutcome(report_id=str(existing["id"]), created=False)
        return _update_report(client, content, existing)
    if content.status == "entered-in-error":
        raise FHIRError(f"FHIR server {client.server} holds no DiagnosticReport with this report's identifier: "
                        "nothing to mark entered-in-error")
    bundle = build_report_bundle(content)
    report = bundle["entry"][-1]["resource"]
    study_id = _find_imaging_study(client, content.study_instance_uid)
    if study_id:
        report["imagingStudy"] = [{"reference": f"ImagingStudy/{study_id}"}]
        validate_resource(report)
    response = client.transaction(bundle)
    entries = response.get("entry") or []
    if len(entries) != len(bundle["entry"]):
        raise FHIRError(f"FHIR server {client.server} answered the report transaction with {len(entries)} "
                        f"entries for {len(bundle['entry'])} requests; it does not follow FHIR transaction "
                        "semantics — check fhir.base_url")
    answer = entries[-1]
    status_line = str((answer.get("response") or {}).get("status", ""))
    status = int(status_line.split()[0]) if status_line[:3].isdigit() else 0
    report_id = _entry_id(answer, "DiagnosticReport")
    if status not in (200, 201) or not report_id:
        raise FHIRError(f"FHIR server {client.server} did not confirm the DiagnosticReport (entry status "
                        f"{status_line or 'missing'}); check the server's transaction support")
    created = status == 201
    log.info("DiagnosticReport %s %s with %d observation(s)%s", report_id,
             "created" if created else "already present", len(entries) - 1,
             ", linked to its ImagingStudy" if study_id else "")
    return ReportOutcome(report_id=report_id, created=created)


def _find_report(client: FhirClient, content: ReportContent) -> dict[str, Any] | None:
    system, value = report_identifier(content)
    found = list(itertools.islice(client.search("DiagnosticReport", {"identifier": f"{system}|{value}",
                                                                     "_count": "2"}), 2))
    if len(found) > 1:
        raise FHIRError(f"FHIR server {client.server} holds {len(found)} DiagnosticReports with this report's "
                        "identifier; resolve the duplicate there before the result can be updated")
    return found[0] if found and found[0].get("id") else None


def _update_report(client: FhirClient, content: ReportContent, existing: dict[str, Any]) -> ReportOutcome:
    """The status change of an existing report as one transaction: each Observation updated by its
    identifier, the DiagnosticReport by id with `If-Match` on the version read."""
    bundle = build_report_bundle(content)
    entries = bundle["entry"]
    for entry in entries[:-1]:
        ident = entry["resource"]["identifier"][0]
        entry["request"] = {"method": "PUT",
                            "url": f"Observation?{_identifier_query(ident['system'], ident['value'])}"}
    report_id = str(existing["id"])
    report = {**entries[-1]["resource"], "id": report_id}
    if existing.get("imagingStudy"):
        report["imagingStudy"] = existing["imagingStudy"]
    validate_resource(report)
    request: dict[str, Any] = {"method": "PUT", "url": f"DiagnosticReport/{report_id}"}
    version = (existing.get("meta") or {}).get("versionId")
    if version:
        request["ifMatch"] = f'W/"{version}"'
    entries[-1] = {"fullUrl": entries[-1]["fullUrl"], "resource": report, "request": request}
    response = client.transaction(bundle)
    answers = response.get("entry") or []
    status_line = str(((answers[-1] if answers else {}).get("response") or {}).get("status", ""))
    if len(answers) != len(entries) or not status_line.startswith(("200", "201")):
        raise FHIRError(f"FHIR server {client.server} did not confirm the DiagnosticReport update (entry "
                        f"status {status_line or 'missing'}); check the server's transaction support")
    log.info("DiagnosticReport %s updated: %s -> %s", report_id, existing.get("status"), content.status)
    return ReportOutcome(report_id=report_id, created=False, updated=True)


def validate_resource(resource: dict[str, Any]) -> None:
    """Validate one resource against its `fhir.resources.R4B` model; ValueError names the element path."""
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        raise ValueError("resource has no resourceType")
    _validate(resource, rtype)


# ---- builders --------------------------------------------------------------------------------------------

def _diagnostic_report(content: ReportContent, issued: datetime, results: list[str]) -> dict[str, Any]:
    system, value = report_identifier(content)
    identifiers: list[dict[str, Any]] = [{"system": system, "value": value}]
    if content.accession_number:
        identifiers.append({"type": _concept(codes.V2_IDENTIFIER_TYPE, *codes.ACCESSION_TYPE),
                            "value": content.accession_number})
    f = content.finding
    reason = content.image_only_reason or "EHR timeline not used"
    conclusion = (f"{_finding_text(content)}; model {content.model_name} {content.model_version}")
    if content.calibration:
        conclusion += f"; probabilities calibrated: {content.calibration}"
    if content.image_only:
        conclusion += f"; image-only: {reason}"
    elif content.drivers:
        conclusion += f"; EHR drivers: {'; '.join(content.drivers)}"
    if content.review:
        conclusion += f"; {'; '.join(content.review)}"
    elif content.status == "preliminary":
        conclusion += "; AI result, not reviewed by a clinician"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "extension": [{"url": codes.IMAGE_ONLY_EXTENSION_URL, "valueBoolean": content.image_only}],
        "identifier": identifiers,
        "status": content.status,
        "category": [_concept(codes.V2_DIAGNOSTIC_SERVICE_SECTION, *codes.CATEGORY_RADIOLOGY)],
        "code": _concept(codes.LOINC, *codes.REPORT_CODE),
        "effectiveDateTime": _instant(content.effective),
        "issued": _instant(issued),
        "result": [{"reference": url} for url in results],
        "conclusion": conclusion,
        "conclusionCode": [_concept(f.system, f.code, f.display)],
        "presentedForm": [{"contentType": "text/plain", "title": "AI result summary",
                           "data": base64.b64encode(_summary(content).encode()).decode("ascii")}],
    }
    if content.interpreter:
        report["resultsInterpreter"] = [{"display": content.interpreter}]
    subject = _subject(content)
    if subject:
        report["subject"] = subject
    return report


def _observation_common(content: ReportContent, issued: datetime) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "status": content.status,
        "category": [_concept(codes.OBSERVATION_CATEGORY, *codes.OBSERVATION_CATEGORY_IMAGING)],
        "effectiveDateTime": _instant(content.effective),
        "issued": _instant(issued),
        "method": {"text": f"{content.model_name} {content.model_version}"},
    }
    subject = _subject(content)
    if subject:
        obs["subject"] = subject
    return obs


def summary_lines(content: ReportContent) -> list[str]:
    """The short human-readable summary (presentedForm here, NTE segments in the HL7 v2 ORU)."""
    lines = [f"Finding: {_finding_text(content)}",
             "Class probabilities: "
             + ", ".join(f"{p.display} {p.probability:.2f}" for p in content.probabilities),
             f"Model: {content.model_name} {content.model_version}"]
    if content.calibration:
        lines.append(f"Calibration: {content.calibration}")
    if content.uncertainty:
        lines.append(f"Uncertainty: {content.uncertainty}")
    if content.image_only:
        lines.append(f"Image-only: {content.image_only_reason or 'EHR timeline not used'}")
    lines += [f"EHR timeline driver: {d}" for d in content.drivers]
    if content.status == "preliminary":
        lines.append("Status: preliminary AI result, not reviewed by a clinician")
    lines += list(content.review)
    if content.interpreter:
        lines.append(f"Reviewed by: {content.interpreter}")
    return lines


def _finding_text(content: ReportContent) -> str:
    """The finding as the conclusion and the summary say it; an indeterminate one says why."""
    f = content.finding
    if content.indeterminate:
        why = content.indeterminate_reason or (f"calibrated probability {f.probability:.2f} lies in the model's "
                                               "indeterminate band around its decision threshold")
        return f"{f.display} ({why}; no class decided, a clinician decides)"
    return f"{f.display} (probability {f.probability:.2f})"


def _summary(content: ReportContent) -> str:
    return "\n".join(summary_lines(content)) + "\n"


def _subject(content: ReportContent) -> dict[str, Any] | None:
    if content.patient_id:
        return {"reference": f"Patient/{content.patient_id}"}
    if content.patient_identifier:
        system, value = content.patient_identifier
        ident = {"system": system, "value": value} if system else {"value": value}
        return {"type": "Patient", "identifier": ident}
    return None


def _entry(content: ReportContent, rtype: str, resource: dict[str, Any], *key: str) -> dict[str, Any]:
    ident = resource["identifier"][0]
    return {"fullUrl": _urn(content, *key), "resource": resource,
            "request": {"method": "POST", "url": rtype,
                        "ifNoneExist": _identifier_query(ident["system"], ident["value"])}}


def _derived_identifier(content: ReportContent, *key: str) -> dict[str, str]:
    return {"system": codes.URI_SYSTEM, "value": _urn(content, *key)}


def _urn(content: ReportContent, *key: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, '|'.join((content.identifier, *key)))}"


def _identifier_query(system: str, value: str) -> str:
    return urlencode({"identifier": f"{system}|{value}"}, safe=":|/")


def _concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding: dict[str, str] = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding], **({"text": display} if display else {})}


def _instant(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _validate(resource: dict[str, Any], rtype: str) -> None:
    try:
        get_fhir_model_class(rtype).model_validate(resource)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = rtype + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.get("loc", ()))
        raise ValueError(f"Generated {rtype} is not valid FHIR R4 at {path}: {err.get('msg')} "
                         f"({len(exc.errors())} error(s) in total); this is a bug in the report builder "
                         "or in the model card's class codes") from exc


# ---- server look-ups -------------------------------------------------------------------------------------

def _find_imaging_study(client: FhirClient, study_uid: str) -> str | None:
    """Id of the server's ImagingStudy for this Study Instance UID, if exactly one exists."""
    query = {"identifier": f"{codes.DICOM_UID_SYSTEM}|urn:oid:{study_uid}", "_count": "2"}
    try:
        found = list(itertools.islice(client.search("ImagingStudy", query), 2))
    except (OperationOutcomeError, ResourceNotFound) as exc:  # server without ImagingStudy search
        log.info("ImagingStudy lookup not supported by the server (HTTP %s); report not linked", exc.status)
        return None
    if len(found) != 1:
        if found:
            log.warning("%d ImagingStudy resources carry this study UID; report not linked", len(found))
        return None
    rid = found[0].get("id")
    return str(rid) if rid else None


def _entry_id(entry: dict[str, Any], rtype: str) -> str | None:
    resource = entry.get("resource")
    if isinstance(resource, dict) and resource.get("id"):
        return str(resource["id"])
    location = str((entry.get("response") or {}).get("location") or "")
    m = re.search(rf"(?:^|/){rtype}/([A-Za-z0-9\-.]{{1,64}})", location)
    return m.group(1) if m else None
