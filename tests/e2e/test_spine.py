"""The spine, end to end on real components: storescu → dicom-fusion serve (listener + Celery worker)
→ SR in Orthanc (dciodvfy-clean) + exactly one DiagnosticReport in the FHIR server.

Runs once with the Redis broker and once with the embedded filesystem broker.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import stop_process
from pydicom import dcmread

from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.inference.synth.generate import SyntheticPatient, generate_cohort
from dicom_fusion.service.demo.components import FhirServer, Pacs, free_port, start_redis
from dicom_fusion.service.outputs.sr.build import read_sr
from dicom_fusion.service.server import wait_for_port
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Job, JobState

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
PHI_STRINGS = ("SYNTH^", "SYN0")  # synthetic names / PatientIDs must never reach the logs


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log: Path
    ledger: Ledger
    pacs: Pacs
    fhir: FhirServer

    def wait_done(self, study_uid: str, timeout: float = 120.0, version: int = 1) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = [j for j in self.ledger.jobs_for_study(study_uid) if j.version == version]
            if jobs and jobs[0].state in (JobState.DONE, JobState.DEAD):
                return jobs[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited early:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)
        raise AssertionError(f"job for {study_uid} not finished in {timeout}s; "
                             f"jobs={[(j.state, j.error) for j in self.ledger.jobs_for_study(study_uid)]}\n"
                             f"{self.log.read_text()[-3000:]}")


def _orthanc(pacs: Pacs, path: str, data: bytes | None = None) -> object:
    req = urllib.request.Request(f"{pacs.http_url}{path}", data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body[:1] in (b"[", b"{") else body


def _sr_instances(pacs: Pacs, study_uid: str, modality: str = "SR") -> list[str]:
    hits = [h for h in _orthanc(pacs, "/tools/lookup", study_uid.encode()) if h["Type"] == "Study"]  # type: ignore[union-attr]
    if not hits:
        return []
    out = []
    for series in _orthanc(pacs, f"/studies/{hits[0]['ID']}/series"):  # type: ignore[union-attr]
        if series["MainDicomTags"].get("Modality") == modality:
            out.extend(series["Instances"])
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, fhir_server: FhirServer) -> list[SyntheticPatient]:
    patients = generate_cohort(3, tmp_path_factory.mktemp("cohort"), seed=11, progress=False)
    with FhirClient(fhir_server.base_url) as client:
        for p in patients:
            client.transaction(json.loads(Path(p.bundle_path).read_text()))
    return patients


@pytest.fixture(params=["redis", "embedded"])
def stack(request: pytest.FixtureRequest, tmp_path: Path, orthanc: Pacs,
          fhir_server: FhirServer) -> Iterator[Stack]:
    extra: dict[str, str] = {}
    redis = None
    if request.param == "redis":
        import shutil

        from conftest import require

        require(shutil.which("redis-server") is not None, "redis-server")
        redis = start_redis(tmp_path / "redis")
        extra["DICOM_FUSION_BROKER__URL"] = redis.url
    try:
        with running_serve(tmp_path, orthanc, fhir_server, extra) as running:
            yield running
    finally:
        if redis is not None:
            redis.stop()


@contextmanager
def running_serve(tmp_path: Path, pacs: Pacs, fhir: FhirServer | None,
                  extra_env: dict[str, str]) -> Iterator[Stack]:
    """`dicom-fusion serve` (listener + embedded worker) on a free loopback port, delivering to `pacs`
    (and `fhir` when given); `extra_env` adds settings. Stopped with SIGTERM (kill after 30 s)."""
    port = free_port()
    data = tmp_path / "var"
    env = dict(os.environ)
    env.pop("DICOM_FUSION_CONFIG", None)
    env.update({
        "DICOM_FUSION_DATA_DIR": str(data),
        "DICOM_FUSION_LISTENER__PORT": str(port),
        "DICOM_FUSION_PACS__AE_TITLE": pacs.ae_title,
        "DICOM_FUSION_PACS__PORT": str(pacs.dicom_port),
        "DICOM_FUSION_COMPLETION__QUIET_SECONDS": "1",
        "DICOM_FUSION_WORKER__EMBEDDED": "true",
        **({"DICOM_FUSION_FHIR__BASE_URL": fhir.base_url} if fhir is not None else {}),
        **extra_env,
    })
    log = tmp_path / "serve.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "serve"], env=env,
                                stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        yield Stack(proc, port, data, log, Ledger(f"sqlite:///{data / 'ledger.sqlite'}"), pacs, fhir)  # type: ignore[arg-type]
    finally:
        stop_process(proc)


def _storescu(storescu: str, stack: Stack, files: list[Path]) -> None:
    subprocess.run([storescu, "-aet", "TESTPACS", "-aec", "DFUSION", "127.0.0.1", str(stack.port),
                    *map(str, files)], check=True, capture_output=True, env=dict(os.environ, TCP_NODELAY="1"))


def test_study_in_sr_and_report_out(stack: Stack, cohort: list[SyntheticPatient], storescu: str,
                                    dciodvfy: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # Each broker variant sends a different patient so the counts below are per-run.
    patient = cohort[0] if "redis" in request.node.callspec.id else cohort[1]
    files = sorted(Path(patient.study_dir).glob("*.dcm"))
    _storescu(storescu, stack, files)
    job = stack.wait_done(patient.study_instance_uid)
    assert job.state == JobState.DONE, job.error
    assert job.sr_uid and job.finding

    # SR in the PACS, same study, valid per dciodvfy
    srs = _sr_instances(stack.pacs, patient.study_instance_uid)
    assert len(srs) == 1
    sr_file = tmp_path / "sr.dcm"
    sr_file.write_bytes(_orthanc(stack.pacs, f"/instances/{srs[0]}/file"))  # type: ignore[arg-type]
    res = subprocess.run([dciodvfy, str(sr_file)], capture_output=True, text=True)
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
    assert errors == [], res.stderr

    # The Grad-CAM Secondary Capture is in the same study, dciodvfy-clean, referenced by the SR, which
    # also names the EHR timeline drivers (the cohort's patients all have a FHIR timeline)
    scs = _sr_instances(stack.pacs, patient.study_instance_uid, modality="OT")
    assert len(scs) == 1
    sc_file = tmp_path / "sc.dcm"
    sc_file.write_bytes(_orthanc(stack.pacs, f"/instances/{scs[0]}/file"))  # type: ignore[arg-type]
    res = subprocess.run([dciodvfy, str(sc_file)], capture_output=True, text=True)
    assert [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")] == []
    reading = read_sr(dcmread(sr_file))
    assert reading.saliency_sop_instance_uid == dcmread(sc_file).SOPInstanceUID
    assert len(reading.drivers) == 3 and not reading.image_only

    # Exactly one DiagnosticReport for the patient, identified by the SR UID
    with FhirClient(stack.fhir.base_url) as client:
        reports = list(client.search("DiagnosticReport", {"subject": f"Patient/{patient.fhir_id}"}))
        assert len(reports) == 1
        ids = [i.get("value") for i in reports[0].get("identifier", [])]
        assert f"urn:oid:{job.sr_uid}" in ids
        # auto release: nobody reviewed it (release.auto_status), and the SR says UNVERIFIED
        assert reports[0]["status"] == "preliminary"
        assert "EHR drivers: " + reading.drivers[0] in reports[0]["conclusion"]

    # Sending the same study again duplicates nothing
    _storescu(storescu, stack, files)
    time.sleep(3)
    assert [j.version for j in stack.ledger.jobs_for_study(patient.study_instance_uid)] == [1]
    assert len(_sr_instances(stack.pacs, patient.study_instance_uid)) == 1
    assert len(_sr_instances(stack.pacs, patient.study_instance_uid, modality="OT")) == 1
    with FhirClient(stack.fhir.base_url) as client:
        assert len(list(client.search("DiagnosticReport", {"subject": f"Patient/{patient.fhir_id}"}))) == 1

    # No patient data in the service's logs
    text = stack.log.read_text()
    for phi in PHI_STRINGS:
        assert phi not in text, f"{phi!r} leaked into serve.log"


def test_the_fold_ensemble_runs_the_spine_and_states_its_spread(
        cohort: list[SyntheticPatient], storescu: str, orthanc: Pacs, fhir_server: FhirServer,
        tmp_path: Path) -> None:
    """`model.ensemble = true`: the worker loads the five members, the SR and the report name the ensemble
    model and carry its spread (issue 20 item 2)."""
    import base64

    patient = cohort[2]
    with running_serve(tmp_path, orthanc, fhir_server, {"DICOM_FUSION_MODEL__ENSEMBLE": "true"}) as stack:
        _storescu(storescu, stack, sorted(Path(patient.study_dir).glob("*.dcm")))
        job = stack.wait_done(patient.study_instance_uid)
        assert job.state == JobState.DONE, job.error
        srs = _sr_instances(stack.pacs, patient.study_instance_uid)
        assert len(srs) == 1
        sr = dcmread(BytesIO(_orthanc(stack.pacs, f"/instances/{srs[0]}/file")))  # type: ignore[arg-type]
        reading = read_sr(sr)
        assert reading.model_name == "dfusion-hybrid-demo-ensemble"
        texts = [str(el.value) for el in sr.iterall() if el.keyword == "TextValue"]
        assert any(t.startswith("Ensemble uncertainty: ensemble of 5 networks; spread ") for t in texts), texts
        with FhirClient(stack.fhir.base_url) as client:
            reports = list(client.search("DiagnosticReport", {"subject": f"Patient/{patient.fhir_id}"}))
        assert len(reports) == 1
        summary = base64.b64decode(reports[0]["presentedForm"][0]["data"]).decode()
        assert "Uncertainty: ensemble of 5 networks" in summary and "dfusion-hybrid-demo-ensemble" in summary
