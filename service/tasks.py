"""Celery app, stage tasks and the one function that enqueues a stage.

Tasks carry a job id only. Each task *claims* its job in the ledger before working (a duplicate
message finds the lease taken and returns), renews the lease while it runs, and on success hands the
job to the next stage. ``acks_late`` + ``reject_on_worker_lost`` make Redis redeliver a message whose
worker died; the ledger's reaper covers brokers that never redeliver (embedded filesystem broker).
Importing this module does not import torch: the listener uses it to enqueue.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init
from kombu import Queue

from dicom_fusion.service.config import Settings
from dicom_fusion.service.ledger import JobState, Ledger, Stage

log = logging.getLogger(__name__)

STAGE_QUEUE = {Stage.PREPARE: "cpu", Stage.TIMELINE: "io", Stage.INFER: "gpu", Stage.DELIVER: "io"}
TASK_NAMES = {stage: f"dicom_fusion.{stage.value}" for stage in STAGE_QUEUE}


class TransientError(Exception):
    """Worth retrying with backoff (PACS/FHIR down, broker hiccup)."""


class PermanentError(Exception):
    """Retrying cannot help (no suitable series, invalid model card); the job goes to dead."""


def make_celery(settings: Settings) -> Celery:
    """Celery app configured from settings; the broker is Redis or the embedded filesystem broker."""
    app = Celery("dicom_fusion", broker=settings.broker_url, set_as_current=False)
    conf: dict[str, Any] = dict(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        task_default_queue="cpu",
        task_queues=[Queue(q) for q in ("cpu", "gpu", "io")],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    if settings.embedded_broker:
        folder = settings.broker_dir
        (folder / "queue").mkdir(parents=True, exist_ok=True)
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        (folder / "control").mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": settings.broker.polling_interval,
        }
        conf["worker_enable_remote_control"] = False
    else:
        conf["broker_transport_options"] = {
            "visibility_timeout": settings.broker.visibility_timeout,
            "polling_interval": settings.broker.polling_interval,
        }
    app.conf.update(conf)
    return app


def enqueue(app: Celery, ledger: Ledger, settings: Settings, job_id: int, stage: Stage,
            *, requeue: bool = False) -> None:
    """Mark the job queued in the ledger *then* publish, so a fast worker never races the mark."""
    ledger.mark_enqueued(job_id, stage=stage, lease_seconds=settings.worker.queued_lease_seconds,
                         requeue=requeue)
    app.send_task(TASK_NAMES[stage], args=[job_id], queue=STAGE_QUEUE[stage])


class _Heartbeat:
    """Renews a job lease while a stage runs, so only a dead worker's job expires."""

    def __init__(self, ledger: Ledger, job_id: int, owner: str, lease: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ledger, job_id, owner, lease), daemon=True)

    def _run(self, ledger: Ledger, job_id: int, owner: str, lease: float) -> None:
        while not self._stop.wait(lease / 3):
            try:
                ledger.renew(job_id, owner=owner, lease_seconds=lease)
            except Exception as exc:
                log.warning("lease renewal for job %s failed: %s", job_id, exc)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


FAULT_PAUSE_ENV = "DICOM_FUSION_FAULT_PAUSE"


def _fault_pause(stage: Stage) -> None:
    """Fault-injection hook for the reliability suite: ``DICOM_FUSION_FAULT_PAUSE=infer:4`` holds
    each claimed ``infer`` stage for 4 s (lease held) so a test can kill -9 the worker mid-stage.
    Never set in production."""
    spec = os.environ.get(FAULT_PAUSE_ENV, "")
    name, _, seconds = spec.partition(":")
    if name == stage.value:
        time.sleep(float(seconds or 5))


def backoff_seconds(settings: Settings, attempt: int) -> float:
    w = settings.worker
    return float(min(w.retry_backoff_seconds * (2 ** max(attempt - 1, 0)), w.retry_backoff_max_seconds))


def run_stage(task: Task, runtime: Any, job_id: int, stage: Stage,
              body: Callable[[Any, Any], Stage]) -> str:
    """Claim → run ``body`` → advance, with retry/dead-letter bookkeeping in the ledger."""
    settings: Settings = runtime.settings
    ledger: Ledger = runtime.ledger
    owner = f"{socket.gethostname()}:{os.getpid()}:{task.request.id}"
    lease = settings.worker.lease_seconds
    job = ledger.claim(job_id, stage=stage, owner=owner, lease_seconds=lease)
    if job is None:
        log.info("job %s stage %s: not claimable (duplicate message or stage done); skipping", job_id, stage)
        return "skipped"
    try:
        with _Heartbeat(ledger, job_id, owner, lease):
            _fault_pause(stage)
            next_stage = body(runtime, job)
    except PermanentError as exc:
        ledger.fail(job_id, owner=owner, reason=f"{stage}: {exc}", retry_in=None, lease_seconds=lease)
        runtime.on_dead(job_id, stage, str(exc))
        log.error("job %s dead at %s: %s", job_id, stage, exc)
        return "dead"
    except Exception as exc:
        attempt = job.attempts + 1
        reason = f"{stage}: {type(exc).__name__}: {exc}"
        if attempt > settings.worker.max_retries:
            ledger.fail(job_id, owner=owner, reason=f"retries exhausted; {reason}", retry_in=None,
                        lease_seconds=lease)
            runtime.on_dead(job_id, stage, reason)
            log.error("job %s dead at %s after %d attempts: %s", job_id, stage, attempt, reason)
            return "dead"
        countdown = backoff_seconds(settings, attempt)
        ledger.fail(job_id, owner=owner, reason=reason, retry_in=countdown,
                    lease_seconds=settings.worker.queued_lease_seconds)
        log.warning("job %s %s failed (attempt %d), retry in %.0fs: %s", job_id, stage, attempt, countdown, reason)
        raise task.retry(countdown=countdown, max_retries=None, exc=exc) from None
    if next_stage == Stage.FINISHED:
        ledger.finish(job_id, owner=owner)
        log.info("job %s done", job_id)
        return JobState.DONE
    if ledger.advance(job_id, owner=owner, next_stage=next_stage,
                      lease_seconds=settings.worker.queued_lease_seconds):
        try:
            runtime.app.send_task(TASK_NAMES[next_stage], args=[job_id], queue=STAGE_QUEUE[next_stage])
        except Exception as exc:  # the reaper re-enqueues when the queued lease expires
            log.error("job %s: could not enqueue %s: %s", job_id, next_stage, exc)
    return str(next_stage)


def register_tasks(app: Celery, runtime_factory: Callable[[], Any]) -> None:
    """Bind one Celery task per stage; the stage bodies live in :mod:`dicom_fusion.service.pipeline`."""
    from dicom_fusion.service import pipeline

    bodies = {Stage.PREPARE: pipeline.prepare, Stage.TIMELINE: pipeline.timeline,
              Stage.INFER: pipeline.infer, Stage.DELIVER: pipeline.deliver}
    for stage, body in bodies.items():
        def _task(self: Task, job_id: int, _stage: Stage = stage, _body: Any = body) -> str:
            return run_stage(self, runtime_factory(), int(job_id), _stage, _body)

        app.task(name=TASK_NAMES[stage], bind=True, acks_late=True, reject_on_worker_lost=True,
                 max_retries=None)(_task)


@worker_process_init.connect
def _reset_after_fork(**_: Any) -> None:
    """Prefork children must not share the parent's database connections."""
    from dicom_fusion.service import runtime as rt

    rt.reset_after_fork()
