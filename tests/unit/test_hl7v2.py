"""HL7 v2 ORU^R01 builder and ACK handling; the `hl7` package parses what we build.

The MLLP transport against a real socket server is in tests/integration/test_mllp.py.
"""
from __future__ import annotations

from datetime import UTC, datetime

import hl7
import pytest

from dicom_fusion.fhir import codes
from dicom_fusion.fhir.hl7v2 import (
    Ack,
    Hl7ApplicationError,
    Hl7Header,
    Hl7Rejected,
    Hl7Unavailable,
    build_oru,
    check_ack,
    escape,
    message_control_id,
    parse_ack,
)
from dicom_fusion.fhir.report import ReportContent, ReportFinding

BENIGN = ReportFinding("3898006", codes.SNOMED_CT, "Neoplasm, benign", 0.25)
MALIGNANT = ReportFinding("363346000", codes.SNOMED_CT, "Malignant neoplastic disease", 0.75)
HEADER = Hl7Header("DFUSION", "RADIOLOGY", "RIS", "HOSPITAL")


def content(**kw) -> ReportContent:
    args = dict(identifier="1.2.826.0.1.3680043.8.498.1.2", patient_id=None,
                patient_identifier=("urn:oid:1.2.826.0.1.3680043.8.498.77", "MRN-42"),
                study_instance_uid="1.2.826.0.1.3680043.8.498.9", accession_number="ACC-7",
                effective=datetime(2025, 3, 1, 9, 30, tzinfo=UTC), model_name="hybrid", model_version="0.1.0",
                probabilities=(BENIGN, MALIGNANT), finding=MALIGNANT, image_only=False, image_only_reason=None)
    args.update(kw)
    return ReportContent(**args)


def test_oru_parses_and_carries_the_report():
    c = content()
    text = build_oru(c, HEADER, now=datetime(2025, 3, 1, 10, 0, tzinfo=UTC))
    msg = hl7.parse(text)
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "OBR", "NTE", "NTE", "NTE", "OBX", "OBX", "OBX"]
    assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    assert msg["MSH.F3"] == "DFUSION" and msg["MSH.F6"] == "HOSPITAL"
    assert msg["MSH.F10"] == message_control_id(c) and len(message_control_id(c)) == 20
    assert msg["MSH.F12"] == "2.5.1" and msg["MSH.F7"] == "20250301100000+0000"
    assert msg["PID.F3.R1.C1"] == "MRN-42"
    assert msg["PID.F3.R1.C4.S2"] == "1.2.826.0.1.3680043.8.498.77" and msg["PID.F3.R1.C4.S3"] == "ISO"
    assert msg["OBR.F2"] == "ACC-7" and msg["OBR.F18"] == "ACC-7"
    assert msg["OBR.F3"] == c.study_instance_uid
    assert str(msg.segment("OBR")[4]) == "18748-4^Diagnostic imaging study^LN"
    assert msg["OBR.F7"] == "20250301093000+0000" and msg["OBR.F25"] == "F"
    obx = list(msg.segments("OBX"))
    assert [(str(o[2]), str(o[3][0][0]), str(o[5])) for o in obx[:2]] == [
        ("NM", "3898006", "0.2500"), ("NM", "363346000", "0.7500")]
    assert str(obx[2][3]) == "121071^Finding^DCM" and str(obx[2][5]).startswith("363346000^")
    assert all(str(o[11]) == "F" for o in obx)
    assert "Finding: Malignant neoplastic disease (probability 0.75)" in str(msg.segment("NTE")[3])


def test_image_only_is_stated_and_no_identifier_means_empty_pid3():
    c = content(image_only=True, image_only_reason="no FHIR Patient has the study's patient identifier",
                patient_identifier=None)
    msg = hl7.parse(build_oru(c, HEADER))
    notes = [msg.unescape(str(n[3])) for n in msg.segments("NTE")]
    assert notes[-1] == "Image-only: no FHIR Patient has the study's patient identifier"
    assert str(msg.segment("PID")) == "PID|1"


def test_delimiters_in_values_are_escaped_and_round_trip():
    tricky = "A|B^C&D~E\\F"
    c = content(accession_number=tricky, patient_identifier=("http://hospital.example/mrn", "X^1"),
                finding=ReportFinding("1", "urn:local", "line1\r\nline2|x", 0.5),
                probabilities=(ReportFinding("1", "urn:local", "line1\r\nline2|x", 0.5),))
    text = build_oru(c, Hl7Header("APP|1", receiving_app="R^S"))
    msg = hl7.parse(text)
    assert len(list(msg)) == 8  # no value broke a segment or added one
    assert msg["OBR.F2"] == tricky
    assert msg["PID.F3.R1.C1"] == "X^1" and msg["PID.F3.R1.C4.S3"] == "URI"
    assert msg["MSH.F3"] == "APP|1" and msg["MSH.F5"] == "R^S"
    assert msg["OBX.F3.R1.C3"] == "L"  # a code system without an HL7 v2 name is local
    assert escape("a\rb") == "a b"


def test_control_id_is_stable_per_result():
    assert message_control_id(content()) == message_control_id(content(accession_number="other"))
    assert message_control_id(content()) != message_control_id(content(identifier="1.2.3"))


def _ack(code: str, control_id: str, text: str = "", err: str = "") -> str:
    segs = [f"MSH|^~\\&|RIS|HOSPITAL|DFUSION|RADIOLOGY|20250301100001||ACK^R01^ACK|A1|P|2.5.1",
            f"MSA|{code}|{control_id}|{text}"]
    if err:
        segs.append(f"ERR||||E||||{err}")  # ERR-4 severity, ERR-8 user message
    return "\x0b" + "\r".join(segs) + "\r\x1c\r"


def test_ack_codes():
    cid = message_control_id(content())
    assert parse_ack(_ack("AA", cid), expected_control_id=cid).accepted
    assert parse_ack(_ack("CA", cid).encode(), expected_control_id=cid).accepted
    ae = parse_ack(_ack("AE", cid, "database busy", err="try later"), expected_control_id=cid)
    assert (ae.code, ae.text) == ("AE", "database busy; try later")
    with pytest.raises(Hl7ApplicationError, match="database busy") as info:
        check_ack(ae)
    assert info.value.retryable
    with pytest.raises(Hl7Rejected, match="unknown patient \\*\\*\\*") as rejected:
        check_ack(parse_ack(_ack("AR", cid, "unknown patient MRN-42"), expected_control_id=cid),
                  redact=("MRN-42",))
    assert not rejected.value.retryable
    assert "MRN-42" not in str(rejected.value)


@pytest.mark.parametrize("raw", ["HTTP/1.1 400 Bad Request\r\n\r\n", "", "MSH|^~\\&|X\rPID|1"])
def test_a_non_ack_is_retryable(raw):
    with pytest.raises(Hl7Unavailable, match="not an HL7 ACK"):
        parse_ack(raw, expected_control_id="X")


def test_an_ack_for_another_message_is_retryable():
    with pytest.raises(Hl7Unavailable, match="acknowledged message OTHER"):
        parse_ack(_ack("AA", "OTHER"), expected_control_id="MINE")


def test_unknown_ack_code():
    with pytest.raises(Hl7Unavailable, match="unknown acknowledgement code"):
        check_ack(Ack("ZZ", "X", ""))
