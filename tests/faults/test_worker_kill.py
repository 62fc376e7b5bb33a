"""Worker kill -9 in the middle of each stage, with the Redis broker and with the embedded broker:
the job is run again (lease reaper / redelivery) and yields exactly one SR and one report."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from conftest import Figures, require
from faultlib import Proc, base_env, wait_until

from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.inference.synth.generate import SyntheticPatient, generate_cohort
from dicom_fusion.service.demo.components import FhirServer, Pacs, free_port, start_redis
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import QUEUED_OWNER, STAGE_STATE, JobState, Stage

pytestmark = [pytest.mark.faults, pytest.mark.integration]

CASES = [(broker, stage) for broker in ("redis", "embedded") for stage in (Stage.PREPARE, Stage.INFER, Stage.DELIVER)]


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory, fhir_server: FhirServer) -> list[SyntheticPatient]:
    cohort = generate_cohort(len(CASES), tmp_path_factory.mktemp("cohort"), seed=23, progress=False)
    with FhirClient(fhir_server.base_url) as client:
        for p in cohort:
            client.transaction(json.loads(Path(p.bundle_path).read_text()))
    return cohort


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.parametrize("broker,stage", CASES, ids=[f"{b}-{s.value}" for b, s in CASES])
def test_worker_kill9(broker: str, stage: Stage, tmp_path: Path, patients: list[SyntheticPatient],
                      orthanc: Pacs, fhir_server: FhirServer, storescu: str, figures: Figures) -> None:
    import subprocess

    patient = patients[CASES.index((broker, stage))]
    extra = {}
    redis = None
    if broker == "redis":
        require(shutil.which("redis-server") is not None, "redis-server")
        redis = start_redis(tmp_path / "redis")
        extra["DICOM_FUSION_BROKER__URL"] = redis.url
    port = free_port()
    env = base_env(tmp_path / "var", port, **extra,
                   DICOM_FUSION_PACS__AE_TITLE=orthanc.ae_title, DICOM_FUSION_PACS__PORT=str(orthanc.dicom_port),
                   DICOM_FUSION_FHIR__BASE_URL=fhir_server.base_url, DICOM_FUSION_WORKER__LEASE_SECONDS="2",
                   DICOM_FUSION_WORKER__QUEUED_LEASE_SECONDS="20", DICOM_FUSION_FAULT_PAUSE=f"{stage.value}:4")
    serve = Proc(["serve"], env, tmp_path / "serve.log", tmp_path).start(wait_port=port)
    try:
        files = sorted(Path(patient.study_dir).glob("*.dcm"))
        subprocess.run([storescu, "-aec", "DFUSION", "127.0.0.1", str(port), *map(str, files)], check=True,
                       capture_output=True)
        figures.rounds, figures.sent = 1, len(files)
        ledger = Ledger(f"sqlite:///{tmp_path / 'var' / 'ledger.sqlite'}")

        def in_stage() -> bool:
            jobs = ledger.jobs_for_study(patient.study_instance_uid)
            return bool(jobs) and jobs[0].state == STAGE_STATE[stage] and jobs[0].stage == stage \
                and jobs[0].lease_owner not in (None, QUEUED_OWNER)

        wait_until(in_stage, 60, f"job claimed at stage {stage}", interval=0.05)
        assert serve.proc is not None
        workers = _children(serve.proc.pid)
        assert workers, "serve should have an embedded worker child"
        for w in workers:
            os.kill(w, signal.SIGKILL)
        figures.crashes = 0

        def finished() -> bool:
            jobs = ledger.jobs_for_study(patient.study_instance_uid)
            return bool(jobs) and jobs[0].state in (JobState.DONE, JobState.DEAD)

        wait_until(finished, 120, "job finished after the worker was killed")
        [job] = ledger.jobs_for_study(patient.study_instance_uid)
        assert job.state == JobState.DONE, job.error
        events = [e.event for e in ledger.audit_events("job", job.id)]
        assert "requeued" in events, events
        srs = orthanc.instance_count(str(job.sr_uid))
        with FhirClient(fhir_server.base_url) as client:
            reports = list(client.search("DiagnosticReport", {"subject": f"Patient/{patient.fhir_id}"}))
        figures.acknowledged = figures.stored = len(files)
        figures.duplicates = max(srs - 1, 0) + max(len(reports) - 1, 0)
        figures.lost = int(srs == 0) + int(not reports)
        assert srs == 1
        assert len(reports) == 1
    finally:
        serve.stop()
        if redis is not None:
            redis.stop()
