"""The FHIR/RIS side end to end: `dicom-fusion serve` with real Orthanc, sekmet-fhir and an MLLP listener.

1. Patient matching: an issuer mapped by `fhir.issuer_systems` matches (timeline used, glucose sent in
   mmol/L arrives in the model's mg/dL); an unknown PatientID and a PatientID shared by two Patients give
   image-only results, flagged with the reason in the SR, the DiagnosticReport and the HL7 ORU.
2. Outage: FHIR down at timeline time → retried, then image-only; FHIR down at report time → retried,
   then `dead` in the ledger; FHIR back + `dicom-fusion redeliver JOB_ID` → done with exactly one report.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import require, write_instance
from mllp_server import MllpServer, running
from pydicom import dcmread

from dicom_fusion.fhir import codes
from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.service.demo import components
from dicom_fusion.service.outputs.sr.reader import read_sr
from dicom_fusion.service.server import wait_for_port
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import DeliveryState, Job, JobState

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

RUN = uuid.uuid4().hex[:8]
ISSUER_OID = "1.2.826.0.1.3680043.8.498.4242"
STUDY_TIME = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)  # StudyDate/StudyTime of conftest.write_instance


class Serve:
    """`dicom-fusion serve` (listener + embedded worker) as a subprocess, with env overrides."""

    def __init__(self, tmp: Path, pacs: components.Pacs, fhir_url: str, **env: str) -> None:
        self.port = components.free_port()
        self.data = tmp / "var"
        self.log = tmp / "serve.log"
        self.env = {k: v for k, v in os.environ.items() if k != "DICOM_FUSION_CONFIG"}
        self.env.update({
            "DICOM_FUSION_DATA_DIR": str(self.data),
            "DICOM_FUSION_LISTENER__PORT": str(self.port),
            "DICOM_FUSION_PACS__AE_TITLE": pacs.ae_title,
            "DICOM_FUSION_PACS__PORT": str(pacs.dicom_port),
            "DICOM_FUSION_FHIR__BASE_URL": fhir_url,
            "DICOM_FUSION_COMPLETION__QUIET_SECONDS": "0.5",
            **env,
        })
        self.cwd = tmp
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "serve"], env=self.env,
                                         stdout=fh, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
        wait_for_port("127.0.0.1", self.port, timeout=60)
        self.ledger = Ledger(f"sqlite:///{self.data / 'ledger.sqlite'}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicom_fusion.service.cli", *args], env=self.env,
                              cwd=self.cwd, capture_output=True, text=True, timeout=60)

    def job(self, study_uid: str) -> Job | None:
        jobs = self.ledger.jobs_for_study(study_uid)
        return jobs[-1] if jobs else None

    def wait(self, what: str, pred: Callable[[], bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited early:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}\n{self.log.read_text()[-3000:]}")

    def wait_finished(self, study_uid: str, timeout: float = 120.0) -> Job:
        self.wait(f"job of {study_uid}", lambda: (j := self.job(study_uid)) is not None
                  and j.state in (JobState.DONE, JobState.DEAD), timeout)
        job = self.job(study_uid)
        assert job is not None
        return job

    def timeline_record(self, job: Job) -> dict[str, Any]:
        return json.loads((self.data / "spool" / "jobs" / f"{job.id:08d}" / "timeline.json").read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.ledger.close()


def _accession(name: str) -> str:
    return f"{name[:4].upper()}{RUN[:6]}"  # SH: at most 16 characters


def _study(tmp: Path, name: str, patient_id: str, issuer: str = "") -> tuple[str, list[Path]]:
    study = f"1.2.826.0.1.3680043.8.498.{int(RUN, 16)}.{int.from_bytes(name.encode()[:8], 'big')}"
    files = []
    for i in (1, 2):
        path = write_instance(tmp / name / f"{i}.dcm", study_uid=study, series_uid=f"{study}.1",
                              sop_uid=f"{study}.1.{i}", patient_id=patient_id)
        ds = dcmread(path)
        ds.AccessionNumber = _accession(name)
        if issuer:
            ds.IssuerOfPatientID = issuer
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study, files


def _send(storescu: str, port: int, files: list[Path]) -> None:
    subprocess.run([storescu, "-aec", "DFUSION", "127.0.0.1", str(port), *map(str, files)], check=True,
                   capture_output=True)


def _report(base_url: str, sr_uid: str) -> list[dict[str, Any]]:
    with FhirClient(base_url) as client:
        return list(client.search("DiagnosticReport", {"identifier": f"urn:dicom:uid|urn:oid:{sr_uid}"}))


def _sr(pacs: components.Pacs, sr_uid: str) -> list[Any]:
    req = urllib.request.Request(f"{pacs.http_url}/tools/lookup", data=sr_uid.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        hits = [h for h in json.loads(r.read()) if h["Type"] == "Instance"]
    out = []
    for h in hits:
        with urllib.request.urlopen(f"{pacs.http_url}/instances/{h['ID']}/file", timeout=10) as r:
            out.append(read_sr(dcmread(io.BytesIO(r.read()))))
    return out


def _load_patients(base_url: str) -> str:
    """A patient under the mapped issuer (with glucose in mmol/L) and two sharing one default-system MRN."""
    pat = f"urn:uuid:{uuid.uuid4()}"
    entries: list[dict[str, Any]] = [{"fullUrl": pat, "resource": {
        "resourceType": "Patient", "identifier": [{"system": f"urn:oid:{ISSUER_OID}", "value": f"MAP-{RUN}"}]},
        "request": {"method": "POST", "url": "Patient"}}]
    for days, mmol in ((10, 5.5), (40, 7.2), (400, 6.1)):
        entries.append({"resource": {
            "resourceType": "Observation", "status": "final", "subject": {"reference": pat},
            "code": {"coding": [{"system": codes.LOINC, "code": "2345-7"}]},
            "effectiveDateTime": (STUDY_TIME - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "valueQuantity": {"value": mmol, "unit": "mmol/L", "system": codes.UCUM, "code": "mmol/L"}},
            "request": {"method": "POST", "url": "Observation"}})
    dup = {"resourceType": "Patient", "identifier": [{"system": "urn:dicom-fusion:mrn", "value": f"DUP-{RUN}"}]}
    entries += [{"resource": dup, "request": {"method": "POST", "url": "Patient"}}] * 2
    with FhirClient(base_url) as client:
        response = client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return str(response["entry"][0]["response"]["location"]).split("Patient/")[1].split("/")[0]


@pytest.fixture
def ris() -> Iterator[MllpServer]:
    with running() as server:
        yield server


def test_matching_rules_and_image_only_flags_reach_sr_report_and_oru(
        tmp_path: Path, orthanc: components.Pacs, fhir_server: components.FhirServer, ris: MllpServer,
        storescu: str) -> None:
    fhir_patient = _load_patients(fhir_server.base_url)
    cases = {  # name: (PatientID, IssuerOfPatientID, expected image-only reason or None)
        "mapped": (f"MAP-{RUN}", "HOSP_A", None),
        "unknown": (f"NOBODY-{RUN}", "", "no FHIR Patient has the study's patient identifier"),
        "shared": (f"DUP-{RUN}", "", "several FHIR Patients share the study's patient identifier; none was used"),
    }
    studies = {name: _study(tmp_path, name, pid, issuer) for name, (pid, issuer, _) in cases.items()}
    serve = Serve(tmp_path, orthanc, fhir_server.base_url,
                  DICOM_FUSION_FHIR__ISSUER_SYSTEMS=json.dumps({"HOSP_A": f"urn:oid:{ISSUER_OID}"}),
                  DICOM_FUSION_HL7__ENABLED="true", DICOM_FUSION_HL7__PORT=str(ris.port),
                  DICOM_FUSION_HL7__RECEIVING_APP="RIS", DICOM_FUSION_HL7__SENDING_FACILITY="RAD")
    try:
        for _, files in studies.values():
            _send(storescu, serve.port, files)
        jobs = {name: serve.wait_finished(study) for name, (study, _) in studies.items()}
    finally:
        serve.stop()

    oru = {str(m["OBR.F3"]): m for m in ris.received}
    assert len(ris.received) == 3 and set(oru) == {study for study, _ in studies.values()}
    for name, (pid, _, reason) in cases.items():
        job, study = jobs[name], studies[name][0]
        assert job.state == JobState.DONE, job.error
        assert job.image_only is (reason is not None)
        deliveries = {d.kind: d for d in serve.ledger.deliveries(job.id)}
        assert {k: d.state for k, d in deliveries.items()} == {
            "sr": DeliveryState.DELIVERED, "report": DeliveryState.DELIVERED, "hl7": DeliveryState.DELIVERED}

        [sr] = _sr(orthanc, str(job.sr_uid))
        assert (sr.image_only, sr.image_only_reason) == (reason is not None, reason)

        [report] = _report(fhir_server.base_url, str(job.sr_uid))
        flag = next(e["valueBoolean"] for e in report["extension"] if e["url"] == codes.IMAGE_ONLY_EXTENSION_URL)
        assert flag is (reason is not None)
        assert report["status"] == "preliminary"  # auto release: nobody reviewed it
        unreviewed = "; AI result, not reviewed by a clinician"
        assert report["conclusion"].endswith(f"image-only: {reason}{unreviewed}") if reason else \
            "image-only" not in report["conclusion"] and report["conclusion"].endswith(unreviewed)

        msg = oru[study]
        notes = [msg.unescape(str(n[3])) for n in msg.segments("NTE")]
        assert (f"Image-only: {reason}" in notes) if reason else not any("Image-only" in n for n in notes)
        assert msg["PID.F3.R1.C1"] == pid and msg["OBR.F2"] == _accession(name)
        assert deliveries["hl7"].remote_id == f"MSH-10 {msg['MSH.F10']}"

    # the mapped issuer found the Patient: the report points at it, the ORU names the issuer's OID
    [report] = _report(fhir_server.base_url, str(jobs["mapped"].sr_uid))
    assert report["subject"] == {"reference": f"Patient/{fhir_patient}"}
    assert oru[studies["mapped"][0]]["PID.F3.R1.C4.S2"] == ISSUER_OID
    # and its glucose, sent in mmol/L, reached the model in the card's mg/dL (400 days back is in the window)
    record = serve.timeline_record(jobs["mapped"])
    assert record["identifier_system"] == f"urn:oid:{ISSUER_OID}"
    glucose = sorted(round(e["value"], 1) for e in record["timeline"]["events"] if e["code"] == "2345-7")
    assert glucose == [99.1, 109.9, 129.7] and record["timeline"]["dropped_values"] == 0
    assert serve.timeline_record(jobs["shared"])["status"] == "ambiguous_patient"

    log = serve.log.read_text()
    for name, (pid, _, _) in cases.items():
        assert pid not in log and _accession(name) not in log, "patient data leaked into serve.log"


def test_fhir_outage_degrades_then_dead_report_is_redelivered_after_recovery(
        tmp_path: Path, orthanc: components.Pacs, storescu: str) -> None:
    require(components.sekmet_executable() is not None, "sekmet-fhir (pip extra [dev])")
    fhir = components.start_fhir_server(tmp_path / "fhir")
    fhir.stop()  # FHIR is down from the start: at timeline time and at report time
    serve = Serve(tmp_path, orthanc, fhir.base_url,
                  DICOM_FUSION_FHIR__RETRIES="0", DICOM_FUSION_FHIR__TIMEOUT="2",
                  DICOM_FUSION_FHIR__UNAVAILABLE_WAIT_SECONDS="600",  # the retry budget ends the wait first
                  DICOM_FUSION_WORKER__MAX_RETRIES="1", DICOM_FUSION_WORKER__RETRY_BACKOFF_SECONDS="0.3")
    try:
        study, files = _study(tmp_path, "outage", f"OUT-{RUN}")
        _send(storescu, serve.port, files)
        job = serve.wait_finished(study)

        # timeline: one retry, then image-only; report: retried, then dead; the SR was delivered
        assert job.state == JobState.DEAD and "report" in (job.error or ""), job.error
        assert job.image_only is True
        assert serve.timeline_record(job)["status"] == "unavailable"
        deliveries = {d.kind: d for d in serve.ledger.deliveries(job.id)}
        assert deliveries["sr"].state == DeliveryState.DELIVERED
        assert deliveries["report"].state == DeliveryState.DEAD and deliveries["report"].attempts >= 2
        assert "unreachable" in (deliveries["report"].last_error or "")
        assert deliveries["hl7"].state == DeliveryState.SKIPPED  # HL7 is off by default
        events = [(e.event, e.detail) for e in serve.ledger.audit_events("job", job.id)]
        assert any(ev == "failed" and detail.startswith("timeline: ") for ev, detail in events)

        refused = serve.cli("redeliver", "99999")
        assert refused.returncode == 1 and "no job 99999" in refused.stderr

        fhir.restart()
        done = serve.cli("redeliver", str(job.id))
        assert done.returncode == 0, done.stderr
        assert f"job {job.id} (v1) re-enqueued at stage deliver" in done.stdout
        serve.wait(f"job {job.id} done after re-delivery",
                   lambda: (j := serve.ledger.job(job.id)) is not None and j.state == JobState.DONE, 60)

        [report] = _report(fhir.base_url, str(job.sr_uid))
        assert report["conclusion"].endswith("image-only: FHIR unavailable: FHIRUnavailable; AI result, not reviewed "
                                             "by a clinician")
        assert len(_sr(orthanc, str(job.sr_uid))) == 1  # the delivered SR was not sent again
        deliveries = {d.kind: d for d in serve.ledger.deliveries(job.id)}
        assert deliveries["report"].state == DeliveryState.DELIVERED
        assert deliveries["report"].remote_id == f"DiagnosticReport/{report['id']}"

        again = serve.cli("redeliver", study)  # by Study Instance UID: the job is done, nothing to do
        assert again.returncode == 1 and "has no dead job to re-deliver" in " ".join(again.stderr.split())
        assert len(_report(fhir.base_url, str(job.sr_uid))) == 1
    finally:
        serve.stop()
        fhir.stop()
