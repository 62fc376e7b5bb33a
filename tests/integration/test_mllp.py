"""HL7 v2 ORU^R01 over MLLP to a real socket listener: ACK, NAK, timeouts, retries, no PHI in logs."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from mllp_server import MllpServer, running

from dicom_fusion.fhir import codes
from dicom_fusion.fhir.hl7v2 import (
    Hl7ApplicationError,
    Hl7Header,
    Hl7Rejected,
    Hl7Unavailable,
    build_oru,
    message_control_id,
)
from dicom_fusion.fhir.mllp import MllpTarget, send_message
from dicom_fusion.fhir.report import ReportContent, ReportFinding
from dicom_fusion.service.demo.components import free_port

pytestmark = pytest.mark.integration

MRN, ACCESSION = "MRN-SECRET-9", "ACC-SECRET-3"
BENIGN = ReportFinding("3898006", codes.SNOMED_CT, "Neoplasm, benign", 0.4)
MALIGNANT = ReportFinding("363346000", codes.SNOMED_CT, "Malignant neoplastic disease", 0.6)
CONTENT = ReportContent(identifier="1.2.826.0.1.3680043.8.498.5.1", patient_id=None,
                        patient_identifier=("urn:dicom-fusion:mrn", MRN),
                        study_instance_uid="1.2.826.0.1.3680043.8.498.5", accession_number=ACCESSION,
                        effective=datetime(2025, 3, 1, 9, 30, tzinfo=UTC), model_name="hybrid",
                        model_version="0.1.0", probabilities=(BENIGN, MALIGNANT), finding=MALIGNANT,
                        image_only=False)
MESSAGE = build_oru(CONTENT, Hl7Header("DFUSION", "RAD", "RIS", "HOSP"))
CONTROL_ID = message_control_id(CONTENT)


@pytest.fixture
def ris() -> Iterator[MllpServer]:
    with running() as server:
        yield server


def _target(port: int, **kw) -> MllpTarget:
    args = dict(timeout=2.0, retries=2, backoff=0.05)
    args.update(kw)
    return MllpTarget("127.0.0.1", port, **args)


def test_oru_is_received_parsed_and_acknowledged(ris: MllpServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="dicom_fusion"):
        ack = send_message(MESSAGE, CONTROL_ID, _target(ris.port), redact=(MRN, ACCESSION))
    assert (ack.code, ack.control_id) == ("AA", CONTROL_ID)
    [msg] = ris.received
    assert msg["MSH.F10"] == CONTROL_ID and msg["PID.F3.R1.C1"] == MRN
    assert msg["OBR.F2"] == ACCESSION and msg["OBR.F3"] == CONTENT.study_instance_uid
    assert [str(o[5]) for o in msg.segments("OBX")][:2] == ["0.4000", "0.6000"]
    assert "delivered" in caplog.text
    assert MRN not in caplog.text and ACCESSION not in caplog.text


def test_application_error_is_retried_then_accepted() -> None:
    sleeps: list[float] = []
    with running(answers=["AE", "AE"]) as ris:
        ack = send_message(MESSAGE, CONTROL_ID, _target(ris.port), sleep=sleeps.append)
    assert ack.code == "AA" and len(ris.received) == 3
    assert sleeps == [0.05, 0.1]  # exponential backoff
    assert {m["MSH.F10"] for m in ris.received} == {CONTROL_ID}  # the same control ID on every retry


def test_application_error_that_persists_fails_with_the_msa_text() -> None:
    with running(default="AE") as ris:
        with pytest.raises(Hl7ApplicationError, match="database busy") as info:
            send_message(MESSAGE, CONTROL_ID, _target(ris.port, retries=1), sleep=lambda s: None)
    assert info.value.retryable and len(ris.received) == 2


def test_reject_is_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    with running(default="AR") as ris, caplog.at_level(logging.DEBUG, logger="dicom_fusion"):
        with pytest.raises(Hl7Rejected, match="receiving application not configured") as info:
            send_message(MESSAGE, CONTROL_ID, _target(ris.port), redact=(MRN, ACCESSION))
    assert not info.value.retryable and len(ris.received) == 1
    assert "hl7.receiving_app" in str(info.value)
    assert MRN not in caplog.text


def test_silent_ris_times_out_and_is_retryable() -> None:
    with running(default="SILENT") as ris:
        started = time.monotonic()
        with pytest.raises(Hl7Unavailable, match="no ACK .* within 0.5 s") as info:
            send_message(MESSAGE, CONTROL_ID, _target(ris.port, timeout=0.5, retries=1, backoff=0.01))
        elapsed = time.monotonic() - started
    assert info.value.retryable and len(ris.received) == 2
    assert 0.9 < elapsed < 5


def test_closed_connection_and_refused_port_are_retryable() -> None:
    with running(default="CLOSE") as ris:
        with pytest.raises(Hl7Unavailable, match="closed the connection without an ACK"):
            send_message(MESSAGE, CONTROL_ID, _target(ris.port, retries=0))
    port = free_port()  # nothing listens there
    with pytest.raises(Hl7Unavailable, match="cannot reach the RIS") as info:
        send_message(MESSAGE, CONTROL_ID, _target(port, retries=2), sleep=lambda s: None)
    assert "hl7.port" in str(info.value)
