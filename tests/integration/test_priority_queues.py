"""Priorities on a real broker (README "Routing", "Priority"; jobs/queues.py): a real worker process
(`server.run_worker` with recording stage bodies, tests/integration/priority_worker.py) on the embedded
filesystem broker and on Redis. With normal jobs queued and one running, an urgent job enqueued then runs
next, all four of its stages before anything else; background runs last; normal jobs finish in order."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.jobs.queues import enqueue, make_celery
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import InstanceRecord, JobRoute, JobState, Priority, Stage
from dicom_fusion.service.storage.schema import upgrade

WORKER = Path(__file__).with_name("priority_worker.py")
NORMAL_JOBS = 5
STAGES = ("prepare", "timeline", "infer", "deliver")


def _job(ledger: Ledger, priority: Priority) -> int:
    """A study of one (fake) instance, completed into one job of `priority`."""
    study = generate_uid()
    ledger.record_instances([InstanceRecord(
        study_uid=study, series_uid=generate_uid(), sop_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        modality="DX", transfer_syntax="1.2.840.10008.1.2.1", path=Path("/nonexistent.dcm"), sha256="0" * 64,
        size=1, calling_ae="TEST")])
    [job_id] = ledger.complete_studies(quiet_before=None, study_uids=[study], route=lambda _id: JobRoute(
        route="r", card_path="", model="m 1", series_uids=(), priority=priority))
    return job_id


def _lines(record: Path) -> list[tuple[int, str]]:
    if not record.exists():
        return []
    return [(int(a), b) for a, b in (ln.split() for ln in record.read_text().splitlines() if ln.strip())]


@pytest.fixture(params=["embedded", "redis"])
def broker_settings(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("DICOM_FUSION_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("DICOM_FUSION_WORKER__TORCH_THREADS", "0")  # the recording bodies need no torch
    monkeypatch.setenv("DICOM_FUSION_LOG_LEVEL", "WARNING")
    monkeypatch.delenv("DICOM_FUSION_CONFIG", raising=False)
    if request.param == "redis":
        monkeypatch.setenv("DICOM_FUSION_BROKER__URL", request.getfixturevalue("redis_server").url)
    else:
        monkeypatch.delenv("DICOM_FUSION_BROKER__URL", raising=False)
    return load_settings()


def test_an_urgent_job_overtakes_queued_normal_jobs_at_every_stage(broker_settings: Settings,
                                                                   tmp_path: Path) -> None:
    settings = broker_settings
    upgrade(settings.ledger_url)
    ledger = Ledger(settings.ledger_url)
    app = make_celery(settings)
    background = _job(ledger, Priority.BACKGROUND)
    normal = [_job(ledger, Priority.NORMAL) for _ in range(NORMAL_JOBS)]
    urgent = _job(ledger, Priority.URGENT)
    for job_id in (background, *normal):  # the background job first: it still runs last
        enqueue(app, ledger, settings, job_id, Stage.PREPARE)
    record = tmp_path / "ran.txt"
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, str(WORKER)], stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PRIORITY_RECORD=str(record), PRIORITY_STAGE_SECONDS="0.4"),
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _lines(record):  # the worker runs its first stage (normal job 1's prepare)
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker took no job in 60 s"
            time.sleep(0.02)
        enqueue(app, ledger, settings, urgent, Stage.PREPARE)
        started_before = len(_lines(record))  # stages that may have started before the urgent message landed
        everyone = (background, *normal, urgent)
        deadline = time.monotonic() + 90
        while any(ledger.job(j).state != JobState.DONE for j in everyone):  # type: ignore[union-attr]
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"not done in 90 s: {_lines(record)}"
            time.sleep(0.05)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        log.close()
        ledger.close()
    ran = _lines(record)
    assert len(ran) == 4 * len(everyone), ran  # each stage ran once
    first_urgent = ran.index((urgent, "prepare"))
    # the urgent job's prepare is the first stage taken after its message was published, and its four
    # stages run back to back: it overtakes the normal jobs' queued prepares, timelines, infers, delivers
    assert first_urgent <= started_before, ran
    assert ran[first_urgent:first_urgent + 4] == [(urgent, s) for s in STAGES], ran
    # only what had started before it (normal job 1's prepare) ran ahead of it
    assert all(job == normal[0] for job, _ in ran[:first_urgent]), ran
    # the background job ran after everything else
    assert ran[-4:] == [(background, s) for s in STAGES], ran
    # within one priority the later stages come first: normal jobs finish in the order they were queued,
    # each one's four stages before the next one's prepare
    normal_runs = [r for r in ran if r[0] in normal]
    assert normal_runs == [(j, s) for j in normal for s in STAGES], normal_runs
