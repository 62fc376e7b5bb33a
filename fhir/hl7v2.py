"""HL7 v2.5.1 ORU^R01 for RISes that do not speak FHIR: the same content as the DiagnosticReport.

Built by hand (segments are short and fixed) with every value escaped per HL7 v2 section 2.7; the
`hl7` package parses what we send in the tests and parses the RIS's ACK here. The message:

    MSH  sending/receiving application + facility, ORU^R01^ORU_R01, control ID derived from the SR UID
    PID  PID-3 = PatientID^^^&<issuer>&ISO|URI^MR (the FHIR identifier system of the patient)
    OBR  OBR-2 placer order = accession number, OBR-3 filler order = Study Instance UID,
         OBR-4 = LOINC 18748-4, OBR-7 = study time, OBR-18 = accession (IHE), OBR-25 = result status
         (P preliminary, F final: a clinician approved it or the site releases AI output as final)
    NTE  the human-readable summary (finding, probabilities, model, image-only reason), one line each
    OBX  one NM per class probability (class code, UCUM "1"), then one CWE with the finding (DCM 121071)

The control ID (MSH-10) is the same for every retry of one result, so a RIS can discard duplicates.
Original-mode acknowledgement: AA (or CA) accepted; AE/CE an application error, worth retrying later;
AR/CR rejected (message type, version, processing id or an application refusing it), not retried.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from dicom_fusion.fhir import codes
from dicom_fusion.fhir.report import ReportContent, summary_lines

VERSION = "2.5.1"
SEGMENT_END = "\r"
_CODING_SYSTEMS = {codes.LOINC: "LN", codes.SNOMED_CT: "SCT", codes.DCM: "DCM", codes.UCUM: "UCUM"}
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Hl7Error(Exception):
    """Base class of HL7 v2 delivery errors; `retryable` says whether sending again later can succeed."""

    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[type[Hl7Error], tuple[str]]:
        return (type(self), (self.message,))


class Hl7Unavailable(Hl7Error):
    """The RIS could not be reached, timed out, or closed the connection without a usable ACK."""

    retryable = True


class Hl7ApplicationError(Hl7Error):
    """The RIS answered AE/CE: it accepted the message but failed to process it."""

    retryable = True


class Hl7Rejected(Hl7Error):
    """The RIS answered AR/CR: it refuses this message; sending it again will not help."""


@dataclass(frozen=True)
class Hl7Header:
    """MSH-3..6: who sends and who receives (as agreed with the RIS's interface team)."""

    sending_app: str
    sending_facility: str = ""
    receiving_app: str = ""
    receiving_facility: str = ""

    def __post_init__(self) -> None:
        if not self.sending_app.strip():
            raise ValueError("Hl7Header.sending_app must not be empty; set hl7.sending_app")


@dataclass(frozen=True)
class Ack:
    """What the RIS answered: MSA-1 code, MSA-2 control ID, MSA-3 text (+ ERR-8 when given)."""

    code: str
    control_id: str
    text: str

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")


def escape(value: str | None) -> str:
    """Escape HL7 delimiters (`\\ | ^ & ~`) and blank out control characters (a CR would end a segment)."""
    text = _CONTROL.sub(" ", value or "")
    for raw, escaped in _ESCAPES:
        text = text.replace(raw, escaped)
    return text


def message_control_id(content: ReportContent) -> str:
    """MSH-10: 20 characters derived from the SR UID, identical for every retry of one result."""
    return "DF" + hashlib.sha256(content.identifier.encode()).hexdigest()[:18].upper()


def build_oru(content: ReportContent, header: Hl7Header, *, now: datetime | None = None,
              processing_id: str = "P") -> str:
    """The ORU^R01 message as text, segments separated by CR (no MLLP framing)."""
    sent = now or datetime.now(UTC)
    f = content.finding
    status = result_status(content)
    segments = [
        _segment("MSH", "^~\\&", escape(header.sending_app), escape(header.sending_facility),
                 escape(header.receiving_app), escape(header.receiving_facility), _ts(sent), "",
                 "ORU^R01^ORU_R01", message_control_id(content), escape(processing_id), VERSION,
                 "", "", "", "", "", "UNICODE UTF-8"),
        _segment("PID", "1", "", _patient_identifier(content)),
        _obr(content, sent),
    ]
    segments += [_segment("NTE", str(i), "L", escape(line)) for i, line in enumerate(summary_lines(content), 1)]
    for i, p in enumerate(content.probabilities, 1):
        segments.append(_segment("OBX", str(i), "NM", _ce(p.system, p.code, p.display), str(i),
                                 f"{float(p.probability):.4f}", f"{codes.UCUM_UNITY}^^UCUM", "", "", "", "",
                                 status, "", "", _ts(content.effective)))
    segments.append(_segment("OBX", str(len(content.probabilities) + 1), "CWE",
                             _ce(codes.DCM, *codes.FINDING_OBSERVATION_CODE), "1", _ce(f.system, f.code, f.display),
                             "", "", "", "", "", status, "", "", _ts(content.effective)))
    return SEGMENT_END.join(segments) + SEGMENT_END


def parse_ack(raw: bytes | str, *, expected_control_id: str) -> Ack:
    """Read an ACK; raises `Hl7Unavailable` when it is not an ACK for our message (retry may help)."""
    import hl7  # the parser is only needed on the sending side

    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    text = text.strip("\x0b\x1c\r\n")
    try:
        message = hl7.parse(text.replace("\n", "\r"))
        msa = message.segment("MSA")
    except (KeyError, IndexError, ValueError, hl7.exceptions.HL7Exception) as exc:
        raise Hl7Unavailable(f"the RIS answered something that is not an HL7 ACK with an MSA segment "
                             f"({type(exc).__name__}); check hl7.host/hl7.port point at its MLLP listener") from exc
    code = str(msa[1]).strip().upper()
    control_id = str(msa[2]).strip() if len(msa) > 2 else ""
    parts = [message.unescape(str(msa[3])).strip()] if len(msa) > 3 and str(msa[3]).strip() else []
    try:
        err = message.segment("ERR")
        if len(err) > 8 and str(err[8]).strip():
            parts.append(message.unescape(str(err[8])).strip())
    except KeyError:
        pass
    if control_id != expected_control_id:
        raise Hl7Unavailable(f"the RIS acknowledged message {control_id or '(none)'} instead of "
                             f"{expected_control_id}; it may have mixed up connections — retrying")
    return Ack(code=code, control_id=control_id, text="; ".join(p for p in parts if p))


def check_ack(ack: Ack, *, redact: tuple[str, ...] = ()) -> None:
    """Raise the error an unaccepted ACK means, with the RIS's text (values in `redact` masked)."""
    if ack.accepted:
        return
    text = ack.text or "no text"
    for value in redact:
        if value:
            text = text.replace(value, "***")
    text = text[:300]
    if ack.code in ("AE", "CE"):
        raise Hl7ApplicationError(f"the RIS answered {ack.code} (application error) to {ack.control_id}: {text}; "
                                  "it will be sent again with backoff")
    if ack.code in ("AR", "CR"):
        raise Hl7Rejected(f"the RIS rejected {ack.control_id} ({ack.code}): {text}; check hl7.receiving_app/"
                          "receiving_facility and the message type and version (ORU^R01, 2.5.1) the RIS accepts")
    raise Hl7Unavailable(f"the RIS answered an unknown acknowledgement code {ack.code!r} to {ack.control_id}")


# ---- segments --------------------------------------------------------------------------------------------

def _segment(name: str, *fields: str) -> str:
    if name == "MSH":  # MSH-1 is the field separator itself
        return "MSH|" + "|".join(fields).rstrip("|")
    return "|".join((name, *fields)).rstrip("|")


def _obr(content: ReportContent, sent: datetime) -> str:
    accession = escape(content.accession_number)
    fields = [""] * 25
    fields[0] = "1"
    fields[1] = accession
    fields[2] = escape(content.study_instance_uid)
    fields[3] = _ce(codes.LOINC, *codes.REPORT_CODE)
    fields[6] = _ts(content.effective)
    fields[17] = accession
    fields[21] = _ts(sent)
    fields[23] = codes.CATEGORY_RADIOLOGY[0]
    fields[24] = result_status(content)
    return _segment("OBR", *fields)


#: HL7 v2 result status (table 0123 for OBR-25, 0085 for OBX-11) of each report status.
_RESULT_STATUS = {"preliminary": "P", "final": "F", "entered-in-error": "W"}


def result_status(content: ReportContent) -> str:
    """OBR-25 / OBX-11 of the report: P, F or W (the FHIR report's status in HL7 v2 terms)."""
    return _RESULT_STATUS[content.status]


def _patient_identifier(content: ReportContent) -> str:
    if not content.patient_identifier:
        return ""
    system, value = content.patient_identifier
    if not system:
        authority = ""
    elif system.startswith("urn:oid:"):
        authority = f"&{escape(system[8:])}&ISO"
    else:
        authority = f"&{escape(system)}&URI"
    return f"{escape(value)}^^^{authority}^MR"


def _ce(system: str, code: str, display: str | None) -> str:
    return f"{escape(code)}^{escape(display)}^{escape(_CODING_SYSTEMS.get(system, 'L'))}"


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")
