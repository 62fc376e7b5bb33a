"""A worker process: its runtime (settings, ledger, spool, Celery app, lazily the model) and the stage
tasks that claim a job, run its stage body and hand it to the next stage.

Each task *claims* its job in the ledger before working (a duplicate message finds the lease taken and
returns), renews the lease while it runs, and on success hands the job to the next stage.
``acks_late`` + ``reject_on_worker_lost`` make Redis redeliver a message whose worker died; the
ledger's reaper covers brokers that never redeliver (embedded filesystem broker).

The runtime is built once by ``dicom-fusion worker`` (:func:`install`) and shared by the stage tasks;
the model and the FHIR client are created on first use so a worker that only serves the ``io`` queue
never loads torch.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.signals import worker_process_init

from dicom_fusion.service.config import Settings
from dicom_fusion.service.errors import PermanentError, TransientError
from dicom_fusion.service.jobs import stages
from dicom_fusion.service.jobs.queues import TASK_NAMES, publish
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import JobState, Stage
from dicom_fusion.service.storage.spool import Spool

if TYPE_CHECKING:
    from dicom_fusion.fhir.client import FhirClient
    from dicom_fusion.inference.card.model import ModelCard
    from dicom_fusion.inference.serve.predict import Predictor
    from dicom_fusion.inference.serve.segment import Segmenter

log = logging.getLogger(__name__)


class JobModels:
    """One model card and what the worker loads from it (predictor, segmenter), each on first use.

    A route names the card its jobs use (`Job.card_path`); the worker keeps one of these per card, so a
    deployment with several routes loads each model once per worker process.
    """

    def __init__(self, card_path: Path, *, device: str, segmenter_override: Path | None,
                 lock: threading.Lock) -> None:
        self.card_path = card_path
        self.device = device
        self.segmenter_override = segmenter_override  # `model.segmenter`: applies to the default model only
        self._lock = lock

    @cached_property
    def card(self) -> ModelCard:
        from dicom_fusion.inference.card.model import load_card

        return load_card(self.card_path)

    @cached_property
    def predictor(self) -> Predictor:
        from dicom_fusion.inference.serve.predict import Predictor

        with self._lock:
            return Predictor.load(self.card_path, device=self.device)

    @cached_property
    def segmenter(self) -> Segmenter | None:
        """The lesion segmenter: `model.segmenter` (default model), else the card's `segmenter` key;
        None = disabled."""
        path = self.segmenter_override or self.card.segmenter
        if path is None:
            return None
        from dicom_fusion.inference.serve.segment import Segmenter

        with self._lock:
            return Segmenter.load(path, device=self.device)


class WorkerRuntime:
    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings = settings
        self.app = app
        self.ledger = Ledger(settings.ledger_url)
        self.spool = Spool(settings.spool_dir, fsync=settings.spool.fsync)
        self._lock = threading.Lock()
        self._models: dict[Path, JobModels] = {}

    def models(self, card_path: str = "") -> JobModels:
        """The models of a job's card (`JobRef.card_path`; "" = the configured default model `model.card`)."""
        default = self.settings.model_card_path()
        path = Path(card_path) if card_path else default
        with self._lock:
            if path not in self._models:
                self._models[path] = JobModels(
                    path, device=self.settings.model.device, lock=threading.Lock(),
                    segmenter_override=self.settings.model.segmenter if path == default else None)
            return self._models[path]

    def fhir_client(self) -> FhirClient:
        from dicom_fusion.service.peers import make_fhir_client

        return make_fhir_client(self.settings.fhir)

    def on_dead(self, job_id: int, stage: Stage, reason: str) -> None:
        """A dead job at delivery leaves the undelivered side visibly dead, never silently pending."""
        if stage == Stage.DELIVER:
            self.ledger.bury_deliveries(job_id, reason=reason)


_runtime: WorkerRuntime | None = None


def install(settings: Settings, app: Celery) -> WorkerRuntime:
    global _runtime
    _runtime = WorkerRuntime(settings, app)
    return _runtime


def get() -> Any:
    if _runtime is None:
        raise RuntimeError("worker runtime not installed; start workers with `dicom-fusion worker`")
    return _runtime


def reset_after_fork() -> None:
    if _runtime is not None:
        _runtime.ledger.engine.dispose(close=False)


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
        if isinstance(exc, TransientError) and exc.retry_in is not None:
            countdown = exc.retry_in  # the peer said when to come back (the stage capped it)
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
            publish(runtime.app, job_id, next_stage)
        except Exception as exc:  # the reaper re-enqueues when the queued lease expires
            log.error("job %s: could not enqueue %s: %s", job_id, next_stage, exc)
    return str(next_stage)


def register_tasks(app: Celery, runtime_factory: Callable[[], Any]) -> None:
    """Bind one Celery task per stage; the stage bodies live in :mod:`dicom_fusion.service.jobs.stages`."""
    bodies = {Stage.PREPARE: stages.prepare, Stage.TIMELINE: stages.timeline,
              Stage.INFER: stages.infer, Stage.DELIVER: stages.deliver}
    for stage, body in bodies.items():
        def _task(self: Task, job_id: int, _stage: Stage = stage, _body: Any = body) -> str:
            return run_stage(self, runtime_factory(), int(job_id), _stage, _body)

        app.task(name=TASK_NAMES[stage], bind=True, acks_late=True, reject_on_worker_lost=True,
                 max_retries=None)(_task)


@worker_process_init.connect
def _reset_after_fork(**_: Any) -> None:
    """Prefork children must not share the parent's database connections."""
    reset_after_fork()
