"""Stage time limits (issue 18): the soft limit fails a stage like a transient error naming the setting, the
hard limit stops the lease renewal so the reaper can act — in the solo pool (SIGALRM in the main thread)
and the threads pool (heartbeat only), where Celery's own limits do not apply."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from dicom_fusion.service.config import load_settings
from dicom_fusion.service.jobs.queues import TASK_NAMES
from dicom_fusion.service.jobs.worker import OVERRUN_EXIT_CODE, register_tasks, run_stage
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import InstanceRecord, JobState, Stage, utcnow


class _Retry(Exception):
    """What the fake task's `retry` raises (Celery raises its own `Retry`)."""

    def __init__(self, countdown: float) -> None:
        super().__init__(countdown)
        self.countdown = countdown


def _task() -> Any:
    def retry(*, countdown: float, max_retries: Any, exc: Exception) -> _Retry:
        return _Retry(countdown)

    return SimpleNamespace(request=SimpleNamespace(id="task-1"), retry=retry)


def _runtime(tmp_path: Path, *, pool: str, max_retries: int = 3) -> Any:
    settings = load_settings(data_dir=tmp_path, worker={
        "soft_time_limits": {"prepare": 0.4}, "hard_time_limit_grace_seconds": 0.4, "lease_seconds": 2,
        "max_retries": max_retries, "retry_backoff_seconds": 0.2, "retry_backoff_max_seconds": 0.2})
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")
    dead: list[tuple[int, Stage, str]] = []
    return SimpleNamespace(settings=settings, ledger=ledger, app=None, pool=pool, dead=dead,
                           on_dead=lambda job_id, stage, reason: dead.append((job_id, stage, reason)))


def _job(ledger: Ledger) -> int:
    ledger.record_instances([InstanceRecord(study_uid="1.2", series_uid="1.2.1", sop_uid="1.2.1.1",
                                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX",
                                            transfer_syntax="1.2.840.10008.1.2.1", path=Path("/x"),
                                            sha256="0" * 64, size=1, calling_ae="PACS")])
    [job] = ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))
    ledger.mark_enqueued(job, stage=Stage.PREPARE, lease_seconds=60)
    return job


def test_solo_soft_limit_interrupts_the_stage_and_retries_naming_the_setting(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, pool="solo")
    job = _job(rt.ledger)
    started = time.monotonic()
    with pytest.raises(_Retry):
        run_stage(_task(), rt, job, Stage.PREPARE, lambda _rt, _job: time.sleep(30))  # type: ignore[func-returns-value]
    assert time.monotonic() - started < 5
    row = rt.ledger.job(job)
    assert row.state == JobState.FAILED and row.attempts == 1
    assert "soft time limit of 0.4 s (worker.soft_time_limits.prepare)" in (row.error or "")


def test_soft_limit_with_retries_spent_is_dead_with_the_setting(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, pool="solo", max_retries=0)
    job = _job(rt.ledger)
    assert run_stage(_task(), rt, job, Stage.PREPARE,
                     lambda _rt, _job: time.sleep(30)) == "dead"  # type: ignore[func-returns-value]
    row = rt.ledger.job(job)
    assert row.state == JobState.DEAD
    assert (row.error or "").startswith("retries exhausted; prepare:")
    assert "worker.soft_time_limits.prepare" in (row.error or "")
    assert rt.dead and rt.dead[0][:2] == (job, Stage.PREPARE)


def test_a_swallowed_soft_limit_still_fails_the_stage(tmp_path: Path) -> None:
    """A body that catches the exception and fails otherwise (deliver records errors per destination)
    still fails with the limit as the reason."""
    rt = _runtime(tmp_path, pool="solo")
    job = _job(rt.ledger)

    def body(_rt: Any, _job: Any) -> Stage:
        try:
            time.sleep(30)
        except Exception as exc:
            raise RuntimeError(f"sr: {type(exc).__name__}") from exc
        return Stage.TIMELINE

    with pytest.raises(_Retry):
        run_stage(_task(), rt, job, Stage.PREPARE, body)
    assert "worker.soft_time_limits.prepare" in (rt.ledger.job(job).error or "")


def test_stage_past_its_hard_limit_stops_renewing_and_the_reaper_sees_it(tmp_path: Path) -> None:
    """Solo pool, a body that ignores the soft limit and runs past the hard one: the heartbeat records the
    overrun (an attempt, with the setting), stops renewing, and the job's lease runs out at its retry
    time, so `expired_jobs` (the reaper) returns it; the late result is discarded."""
    rt = _runtime(tmp_path, pool="solo")
    job = _job(rt.ledger)

    def stubborn(_rt: Any, _job: Any) -> Stage:
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            try:
                time.sleep(0.05)
            except SoftTimeLimitExceeded:
                pass
        return Stage.TIMELINE

    assert run_stage(_task(), rt, job, Stage.PREPARE, stubborn) == "overran"
    row = rt.ledger.job(job)
    assert row.state == JobState.FAILED and row.attempts == 1
    assert row.stage == Stage.PREPARE  # not advanced by the late result
    assert "hard time limit of 0.8 s (worker.soft_time_limits.prepare" in (row.error or "")
    deadline = time.monotonic() + 3
    while job not in [j for j, _ in rt.ledger.expired_jobs()]:
        assert time.monotonic() < deadline, "the reaper never saw the overrun job"
        time.sleep(0.05)


_STUCK_SOLO_WORKER = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
from celery.exceptions import SoftTimeLimitExceeded
sys.path.insert(0, sys.argv[2])
from test_worker_limits import _job, _runtime, _task
from dicom_fusion.service.jobs.worker import run_stage
from dicom_fusion.service.storage.models import Stage

def stuck(_rt, _job):
    while True:  # deaf to the soft limit, as a call stuck in C code would be
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            pass

rt = _runtime(Path(sys.argv[1]), pool="solo")
job = _job(rt.ledger)
print(job, flush=True)
run_stage(_task(), rt, job, Stage.PREPARE, stuck)
print("returned", flush=True)
"""


def test_solo_worker_stuck_past_its_hard_limit_ends_its_process(tmp_path: Path) -> None:
    """Solo pool, a stage deaf to the soft limit: the overrun is recorded, and 5 s (`_KILL_AFTER_OVERRUN`)
    after the hard limit the process ends with OVERRUN_EXIT_CODE, so its supervisor starts a fresh
    worker instead of keeping one that can never take another job (as Celery's prefork pool does)."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _STUCK_SOLO_WORKER, str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert proc.returncode == OVERRUN_EXIT_CODE, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "returned" not in proc.stdout
    assert "ending this worker process" in proc.stderr
    assert took < 20, f"took {took:.1f} s"  # hard limit 0.8 s + 5 s, plus the interpreter's start
    job = int(proc.stdout.split()[0])
    row = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}").job(job)
    assert row.state == JobState.FAILED and "hard time limit of 0.8 s" in (row.error or "")


def test_threads_pool_has_no_soft_interrupt_but_the_hard_limit_frees_the_job(tmp_path: Path) -> None:
    """In a worker thread no signal can interrupt the body: it runs on, but past the hard limit its lease
    is given up and recorded all the same."""
    rt = _runtime(tmp_path, pool="threads")
    job = _job(rt.ledger)
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(
        run_stage(_task(), rt, job, Stage.PREPARE, lambda _rt, _job: time.sleep(1.5) or Stage.TIMELINE)))
    t.start()
    t.join(10)
    assert out == ["overran"]
    row = rt.ledger.job(job)
    assert row.state == JobState.FAILED and "hard time limit" in (row.error or "")


def test_a_stage_within_its_limits_advances(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, pool="solo")
    job = _job(rt.ledger)
    rt.app = SimpleNamespace(send_task=lambda *a, **k: None)
    assert run_stage(_task(), rt, job, Stage.PREPARE, lambda _rt, _job: Stage.TIMELINE) == "timeline"
    row = rt.ledger.job(job)
    assert row.stage == Stage.TIMELINE and row.attempts == 0


def test_limits_come_from_settings_and_reach_the_celery_tasks(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path, fhir={"timeline_deadline_seconds": 20},
                      worker={"soft_time_limits": {"infer": 1200}, "hard_time_limit_grace_seconds": 10})
    assert s.stage_time_limits("timeline") == (50.0, 60.0)  # the FHIR deadline + 30 s, then the grace
    assert s.stage_time_limits("infer") == (1200.0, 1210.0)
    assert s.stage_time_limits("prepare") == (300.0, 310.0)
    app = Celery("t", set_as_current=False)
    register_tasks(app, lambda: None, s)
    task = app.tasks[TASK_NAMES[Stage.TIMELINE]]
    assert task.soft_time_limit == 50.0
    assert 60.0 < task.time_limit <= 70.0  # the kill comes after the heartbeat has recorded the overrun
