"""Worker kill -9 in the middle of each stage, with the Redis broker and with the embedded broker:
the job is run again (lease reaper / redelivery) and yields exactly one SR and one report.

``test_worker_kill_recovery``: with the default 60 s lease, `serve` releases the dead worker's leases as
soon as it sees it exit and re-enqueues the job, so the result arrives seconds after the restart
(issue 17, item 3), FAULT_ROUNDS kills in a row."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import FAULT_ROUNDS, Figures, require
from faultlib import Proc, base_env, report_measure, wait_until

from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.inference.synth.generate import SyntheticPatient, generate_cohort
from dicom_fusion.service.demo.components import FhirServer, Pacs, free_port, start_redis
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import QUEUED_OWNER, STAGE_STATE, JobState, Stage, utcnow

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
            reports = list(client.search("DiagnosticReport", {"identifier": f"urn:dicom:uid|urn:oid:{job.sr_uid}"}))
        figures.acknowledged = figures.stored = len(files)
        figures.duplicates = max(srs - 1, 0) + max(len(reports) - 1, 0)
        figures.lost = int(srs == 0) + int(not reports)
        assert srs == 1
        assert len(reports) == 1
    finally:
        serve.stop()
        if redis is not None:
            redis.stop()


RECOVERY_LIMIT_S = 10.0  # the result after the restarted worker is ready (issue 17, item 3)
REQUEUE_LIMIT_S = 2.0  # kill → job re-enqueued (was worker.lease_seconds, 60 s by default)


@pytest.fixture(scope="module")
def recovery_patients(tmp_path_factory: pytest.TempPathFactory, fhir_server: FhirServer) -> list[SyntheticPatient]:
    cohort = generate_cohort(FAULT_ROUNDS, tmp_path_factory.mktemp("recovery"), seed=29, progress=False)
    with FhirClient(fhir_server.base_url) as client:
        for p in cohort:
            client.transaction(json.loads(Path(p.bundle_path).read_text()))
    return cohort


def _worker_ready(log: Path, pid: int) -> bool:
    """Celery logged "dfusion-<pid>@<host> ready." for that worker process."""
    return any(f"dfusion-{pid}@" in line and line.rstrip().endswith("ready.")
               for line in log.read_text(errors="replace").splitlines())


def _spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f} s (mean {sum(values) / len(values):.1f})"


def test_worker_kill_recovery(tmp_path: Path, recovery_patients: list[SyntheticPatient], orthanc: Pacs,
                              fhir_server: FhirServer, storescu: str, figures: Figures,
                              request: pytest.FixtureRequest) -> None:
    """Embedded broker (it never redelivers), default lease (60 s): each round kills the worker while
    it holds a job at infer. The job is re-enqueued within REQUEUE_LIMIT_S of the kill and its result
    arrives within RECOVERY_LIMIT_S of the new worker being ready; the time from the new process's
    start (its cold start: imports, model load) is reported beside it."""
    port = free_port()
    env = base_env(tmp_path / "var", port, DICOM_FUSION_PACS__AE_TITLE=orthanc.ae_title,
                   DICOM_FUSION_PACS__PORT=str(orthanc.dicom_port), DICOM_FUSION_FHIR__BASE_URL=fhir_server.base_url,
                   DICOM_FUSION_FAULT_PAUSE=f"{Stage.INFER.value}:60")
    log_path = tmp_path / "serve.log"
    serve = Proc(["serve"], env, log_path, tmp_path).start(wait_port=port)
    assert serve.proc is not None
    ledger = Ledger(f"sqlite:///{tmp_path / 'var' / 'ledger.sqlite'}")
    requeued_after: list[float] = []
    after_spawn: list[float] = []
    after_ready: list[float] = []
    try:
        for patient in recovery_patients:
            files = sorted(Path(patient.study_dir).glob("*.dcm"))
            subprocess.run([storescu, "-aec", "DFUSION", "127.0.0.1", str(port), *map(str, files)], check=True,
                           capture_output=True)
            figures.sent += len(files)

            def held_at_infer(uid: str = patient.study_instance_uid) -> bool:
                jobs = ledger.jobs_for_study(uid)
                return bool(jobs) and jobs[0].stage == Stage.INFER and jobs[0].state == STAGE_STATE[Stage.INFER] \
                    and jobs[0].lease_owner not in (None, QUEUED_OWNER)

            wait_until(held_at_infer, 120, "job held at infer", interval=0.05)
            [job] = ledger.jobs_for_study(patient.study_instance_uid)
            [worker] = _children(serve.proc.pid)
            os.kill(worker, signal.SIGKILL)
            killed_at = utcnow()
            new: list[int] = []
            wait_until(lambda old=worker: bool(new.extend(p for p in _children(serve.proc.pid) if p != old) or new),
                       30, "serve restarting its worker", interval=0.02)
            spawned = time.monotonic()
            wait_until(lambda pid=new[0]: _worker_ready(log_path, pid), 60, "the new worker ready", interval=0.05)
            ready = time.monotonic()

            def finished(uid: str = patient.study_instance_uid) -> bool:
                jobs = ledger.jobs_for_study(uid)
                return bool(jobs) and jobs[0].state in (JobState.DONE, JobState.DEAD)

            wait_until(finished, 120, "job finished after the worker was killed", interval=0.05)
            done = time.monotonic()
            [job] = ledger.jobs_for_study(patient.study_instance_uid)
            assert job.state == JobState.DONE, job.error
            events = ledger.audit_events("job", job.id)
            names = [e.event for e in events]
            assert "lease_released" in names, names
            requeued = [e.ts for e in events if e.event == "requeued" and e.ts >= killed_at]
            assert requeued, names
            requeued_after.append((min(requeued) - killed_at).total_seconds())
            after_spawn.append(done - spawned)
            after_ready.append(done - ready)
            srs = orthanc.instance_count(str(job.sr_uid))
            with FhirClient(fhir_server.base_url) as client:
                # by the report's identifier (the SR UID), not by patient: the module's cohorts reuse patient ids
                reports = list(client.search("DiagnosticReport", {"identifier": f"urn:dicom:uid|urn:oid:{job.sr_uid}"}))
            figures.rounds += 1
            figures.acknowledged += len(files)
            figures.stored += len(files)
            figures.duplicates += max(srs - 1, 0) + max(len(reports) - 1, 0)
            figures.lost += int(srs == 0) + int(not reports)
        report_measure(request.config, "worker_kill_recovery",
                       f"{len(after_ready)} kill -9 of the worker at infer (lease 60 s): re-enqueued "
                       f"{_spread(requeued_after)} after the kill; result {_spread(after_ready)} after the new "
                       f"worker was ready, {_spread(after_spawn)} after it was started (cold start included)")
        assert figures.lost == 0 and figures.duplicates == 0
        assert max(requeued_after) < REQUEUE_LIMIT_S, requeued_after
        assert max(after_ready) < RECOVERY_LIMIT_S, after_ready
    finally:
        serve.stop()
        ledger.close()
