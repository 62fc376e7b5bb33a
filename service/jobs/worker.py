"""A worker process: its runtime (settings, ledger, spool, Celery app, lazily the model) and the stage
tasks that claim a job, run its stage body and hand it to the next stage.

Each task *claims* its job in the ledger before working (a duplicate message finds the lease taken and
returns), renews the lease while it runs, and on success hands the job to the next stage.
``acks_late`` + ``reject_on_worker_lost`` make Redis redeliver a message whose worker died; the
ledger's reaper covers brokers that never redeliver (embedded filesystem broker).

The runtime is built once by ``dicom-fusion worker`` (:func:`install`) and shared by the stage tasks;
the model and the FHIR client are created on first use so a worker that only serves the ``io`` queue
never loads torch. Each model stays loaded after its first use, up to ``worker.max_loaded_models`` per
process; beyond it the least recently used one is released (:meth:`WorkerRuntime.models`).
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init

from dicom_fusion.service.config import Settings
from dicom_fusion.service.errors import PermanentError, TransientError
from dicom_fusion.service.jobs import stages
from dicom_fusion.service.jobs.queues import TASK_NAMES, publish
from dicom_fusion.service.jobs.reaper import owner_prefix
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import JobState, Priority, Stage
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
    deployment with several routes loads each model once per worker process (and again only after the
    cache of :meth:`WorkerRuntime.models` released it).
    """

    def __init__(self, card_path: Path, *, device: str, segmenter_override: Path | None,
                 lock: threading.Lock) -> None:
        self.card_path = card_path
        self.device = device
        self.segmenter_override = segmenter_override  # `model.segmenter`: applies to the default model only
        self._lock = lock

    @property
    def loaded(self) -> bool:
        """Weights in memory (the predictor or the segmenter was loaded)."""
        return "predictor" in self.__dict__ or "segmenter" in self.__dict__

    @cached_property
    def card(self) -> ModelCard:
        from dicom_fusion.inference.card.model import load_card

        return load_card(self.card_path)

    @cached_property
    def predictor(self) -> Predictor:
        from dicom_fusion.inference.serve.predict import Predictor

        started = time.monotonic()
        with self._lock:
            predictor = Predictor.load(self.card_path, device=self.device)
        log.info("model cache: loaded %s in %.3f s", self.card_path, time.monotonic() - started)
        return predictor

    @cached_property
    def segmenter(self) -> Segmenter | None:
        """The lesion segmenter: `model.segmenter` (default model), else the card's `segmenter` key;
        None = disabled."""
        path = self.segmenter_override or self.card.segmenter
        if path is None:
            return None
        from dicom_fusion.inference.serve.segment import Segmenter

        started = time.monotonic()
        with self._lock:
            segmenter = Segmenter.load(path, device=self.device)
        log.info("model cache: loaded segmenter %s in %.3f s", path, time.monotonic() - started)
        return segmenter


def _free_model_memory() -> None:
    """After a model was dropped: collect it now (nn.Module graphs hold reference cycles) and, on a GPU,
    hand the freed cached blocks back to the device (for the next model, other processes)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class WorkerRuntime:
    def __init__(self, settings: Settings, app: Celery, *, pool: str | None = None) -> None:
        self.settings = settings
        self.app = app
        # the Celery pool the tasks run in: "solo" runs them in the main thread, where `run_stage` enforces
        # the soft time limit itself (Celery does so only in the prefork pool)
        self.pool = pool or settings.worker.pool
        self.ledger = Ledger(settings.ledger_url)
        self.spool = Spool(settings.spool_dir, fsync=settings.spool.fsync)
        self._lock = threading.Lock()
        # card path -> its models, least recently used first; at most `worker.max_loaded_models` entries
        self._models: OrderedDict[Path, JobModels] = OrderedDict()
        self.max_loaded_models = settings.worker.max_loaded_models

    def models(self, card_path: str = "") -> JobModels:
        """The models of a job's card (`JobRef.card_path`; "" = the configured default model `model.card`),
        kept after first use so the next study on that model pays no load time. Beyond
        `worker.max_loaded_models` cards the least recently used is dropped (its predictor and segmenter
        are freed once no running stage holds them; on a GPU the cached blocks go back to the device)."""
        default = self.settings.model_card_path()
        path = Path(card_path) if card_path else default
        evicted: list[JobModels] = []
        with self._lock:
            models = self._models.get(path)
            if models is None:
                models = self._models[path] = JobModels(
                    path, device=self.settings.model.device, lock=threading.Lock(),
                    segmenter_override=self.settings.model.segmenter if path == default else None)
                while len(self._models) > self.max_loaded_models:
                    evicted.append(self._models.popitem(last=False)[1])
            else:
                self._models.move_to_end(path)
        if evicted:
            weights = any(m.loaded for m in evicted)
            log.info("model cache: released %s (least recently used; worker.max_loaded_models = %d)",
                     ", ".join(str(m.card_path) for m in evicted), self.max_loaded_models)
            evicted.clear()  # the last references this runtime held
            if weights:
                _free_model_memory()
        return models

    def loaded_models(self) -> list[Path]:
        """The cards whose models this worker keeps, least recently used first."""
        with self._lock:
            return list(self._models)

    def fhir_client(self) -> FhirClient:
        from dicom_fusion.service.peers import make_fhir_client

        return make_fhir_client(self.settings.fhir)

    def on_dead(self, job_id: int, stage: Stage, reason: str) -> None:
        """A dead job at delivery leaves the undelivered side visibly dead, never silently pending."""
        if stage == Stage.DELIVER:
            self.ledger.bury_deliveries(job_id, reason=reason)


_runtime: WorkerRuntime | None = None


def install(settings: Settings, app: Celery, *, pool: str | None = None) -> WorkerRuntime:
    global _runtime
    _runtime = WorkerRuntime(settings, app, pool=pool)
    return _runtime


def get() -> Any:
    if _runtime is None:
        raise RuntimeError("worker runtime not installed; start workers with `dicom-fusion worker`")
    return _runtime


def reset_after_fork() -> None:
    if _runtime is not None:
        _runtime.ledger.engine.dispose(close=False)


class _Heartbeat:
    """Renews a job lease while a stage runs, so only a dead worker's job expires — and only up to the
    stage's hard time limit.

    A stage stuck past its hard limit (a call without a deadline, a swallowed soft-limit exception, the
    threads pool where nothing can interrupt a task) would otherwise hold its job forever: the heartbeat
    renewing the lease is exactly what keeps the reaper away. So at `hard_limit` seconds it stops renewing
    and calls `on_overrun` once (which records the overrun in the ledger); the lease then runs out and the
    reaper re-enqueues the job for a free worker.

    With `exit_after` (the solo pool) it then gives the stage that many more seconds and, if it is still
    running, ends the process: a solo worker runs its one task in its main thread, so a stage stuck there
    would keep the worker from taking any other job for ever. Its supervisor (`serve` for the embedded
    worker, systemd / Kubernetes for a standalone one) starts a fresh one, as Celery's prefork pool does
    with a child past its hard limit. The threads pool cannot do this without killing its other tasks.
    """

    def __init__(self, ledger: Ledger, job_id: int, owner: str, lease: float, *,
                 hard_limit: float | None = None, on_overrun: Callable[[], None] | None = None,
                 exit_after: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stop = threading.Event()
        self._hard_limit = hard_limit
        self._on_overrun = on_overrun
        self._exit_after = exit_after
        self._clock = clock
        self.overran = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ledger, job_id, owner, lease), daemon=True)

    def _run(self, ledger: Ledger, job_id: int, owner: str, lease: float) -> None:
        started = self._clock()
        while True:
            wait = lease / 3
            if self._hard_limit is not None:
                wait = max(0.0, min(wait, started + self._hard_limit - self._clock()))
            if self._stop.wait(wait):
                return
            if self._hard_limit is not None and self._clock() - started >= self._hard_limit:
                self.overran.set()
                log.error("job %s: stage still running at its hard time limit (%.0f s); no longer renewing "
                          "its lease, the reaper re-enqueues it", job_id, self._hard_limit)
                if self._on_overrun is not None:
                    try:
                        self._on_overrun()
                    except Exception as exc:
                        log.warning("job %s: recording the overrun failed: %s", job_id, exc)
                if self._exit_after is not None and not self._stop.wait(self._exit_after):
                    log.critical("job %s: stage still running %.0f s after its hard time limit; ending this "
                                 "worker process (exit %d) so that its supervisor starts a fresh one",
                                 job_id, self._exit_after, OVERRUN_EXIT_CODE)
                    logging.shutdown()
                    os._exit(OVERRUN_EXIT_CODE)
                return
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


@contextmanager
def _soft_limit_alarm(seconds: float, *, enabled: bool) -> Iterator[None]:
    """Raise `SoftTimeLimitExceeded` in the running stage after `seconds` (SIGALRM), as Celery's prefork pool
    does with its soft time limit. Only where Celery does not: the solo pool runs tasks in the worker's main
    thread, the one thread a signal handler can interrupt (a blocking socket read included: it returns
    EINTR and the handler raises). Elsewhere (prefork: Celery does it; threads: impossible) a no-op."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(_signum: int, _frame: object) -> None:
        raise SoftTimeLimitExceeded(f"soft time limit ({seconds:g} s) exceeded")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def limit_setting(stage: Stage) -> str:
    """The setting that bounds a stage's run time, as reasons and logs name it."""
    return f"worker.soft_time_limits.{stage.value}"


FAULT_PAUSE_ENV = "DICOM_FUSION_FAULT_PAUSE"


def _fault_pause(stage: Stage, job_dir: Path) -> None:
    """Fault-injection hook for the reliability suite: ``DICOM_FUSION_FAULT_PAUSE=infer:4`` holds
    a job's first claim of ``infer`` for 4 s (lease held) so a test can kill -9 the worker mid-stage;
    the run after the kill goes straight on (a marker in the job's folder), so the test measures the
    recovery, not the pause. Never set in production."""
    spec = os.environ.get(FAULT_PAUSE_ENV, "")
    name, _, seconds = spec.partition(":")
    marker = job_dir / f".fault-paused-{stage.value}"
    if name == stage.value and not marker.exists():
        marker.touch()
        time.sleep(float(seconds or 5))


def backoff_seconds(settings: Settings, attempt: int) -> float:
    w = settings.worker
    return float(min(w.retry_backoff_seconds * (2 ** max(attempt - 1, 0)), w.retry_backoff_max_seconds))


def run_stage(task: Task, runtime: Any, job_id: int, stage: Stage,
              body: Callable[[Any, Any], Stage]) -> str:
    """Claim → run ``body`` → advance, with retry/dead-letter bookkeeping in the ledger."""
    settings: Settings = runtime.settings
    ledger: Ledger = runtime.ledger
    owner = owner_prefix(os.getpid()) + str(task.request.id)  # "host:pid:task": reaper releases by pid
    lease = settings.worker.lease_seconds
    job = ledger.claim(job_id, stage=stage, owner=owner, lease_seconds=lease)
    if job is None:
        log.info("job %s stage %s: not claimable (duplicate message or stage done); skipping", job_id, stage)
        return "skipped"
    soft, hard = settings.stage_time_limits(stage.value)
    started = time.monotonic()

    def overrun() -> None:  # the heartbeat, at the hard limit: count the attempt; the reaper re-enqueues
        reason = (f"{stage}: still running at its hard time limit of {hard:g} s ({limit_setting(stage)} = "
                  f"{soft:g} s + worker.hard_time_limit_grace_seconds); raise the setting if the stage "
                  "needs longer")
        if job.attempts + 1 > settings.worker.max_retries:
            ledger.fail(job_id, owner=owner, reason=f"retries exhausted; {reason}", retry_in=None,
                        lease_seconds=lease)
            runtime.on_dead(job_id, stage, reason)
        else:  # lease_seconds=0: the lease runs out at the retry time and the reaper re-enqueues then
            ledger.fail(job_id, owner=owner, reason=reason, retry_in=backoff_seconds(settings, job.attempts + 1),
                        lease_seconds=0)

    solo = getattr(runtime, "pool", "solo") == "solo"
    heartbeat = _Heartbeat(ledger, job_id, owner, lease, hard_limit=hard, on_overrun=overrun,
                           exit_after=_KILL_AFTER_OVERRUN if solo else None)
    try:
        with heartbeat, _soft_limit_alarm(soft, enabled=solo):
            if os.environ.get(FAULT_PAUSE_ENV):
                _fault_pause(stage, runtime.spool.job_dir(job_id))
            next_stage = body(runtime, job)
    except BaseException as exc:
        if heartbeat.overran.is_set():  # already recorded, and the job may run elsewhere by now
            log.error("job %s %s ended after its hard time limit (%s: %s); result discarded", job_id, stage,
                      type(exc).__name__, exc)
            return "overran"
        if isinstance(exc, SoftTimeLimitExceeded) or time.monotonic() - started >= soft:
            # the limit fired, whatever the body made of it (deliver records it per destination)
            exc = TransientError(f"passed its soft time limit of {soft:g} s ({limit_setting(stage)}); "
                                 f"raise the setting if the stage needs longer "
                                 f"(last error: {type(exc).__name__})")
        return _failed(task, runtime, job, owner, stage, exc)
    if heartbeat.overran.is_set():
        log.error("job %s %s finished after its hard time limit; result discarded (the job was re-enqueued)",
                  job_id, stage)
        return "overran"
    return _succeeded(runtime, job_id, owner, next_stage, job.priority)


def _failed(task: Task, runtime: Any, job: Any, owner: str, stage: Stage, exc: BaseException) -> str:
    """Record a stage's failure: dead (permanent, or retries spent) or failed with a retry scheduled."""
    settings: Settings = runtime.settings
    ledger: Ledger = runtime.ledger
    job_id = job.job_id
    lease = settings.worker.lease_seconds
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: the worker is going away
        raise exc
    if isinstance(exc, PermanentError):
        ledger.fail(job_id, owner=owner, reason=f"{stage}: {exc}", retry_in=None, lease_seconds=lease)
        runtime.on_dead(job_id, stage, str(exc))
        log.error("job %s dead at %s: %s", job_id, stage, exc)
        return "dead"
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


def _succeeded(runtime: Any, job_id: int, owner: str, next_stage: Stage,
               priority: Priority = Priority.NORMAL) -> str:
    """Finish the job or hand it to the next stage's queue (of the job's priority)."""
    settings: Settings = runtime.settings
    ledger: Ledger = runtime.ledger
    if next_stage == Stage.FINISHED:
        final = ledger.finish(job_id, owner=owner)
        log.info("job %s %s", job_id, final or JobState.DONE)
        return final or JobState.DONE
    if next_stage == Stage.REVIEW:  # parked until a reviewer approves or rejects (no message to send)
        ledger.await_review(job_id, owner=owner)
        log.info("job %s awaiting review", job_id)
        return JobState.AWAITING_REVIEW
    if ledger.advance(job_id, owner=owner, next_stage=next_stage,
                      lease_seconds=settings.worker.queued_lease_seconds):
        try:
            publish(runtime.app, job_id, next_stage, priority)
        except Exception as exc:  # the reaper re-enqueues when the queued lease expires
            log.error("job %s: could not enqueue %s: %s", job_id, next_stage, exc)
    return str(next_stage)


#: Seconds between the heartbeat giving up a stage past its hard limit and the process running it being
#: ended (by Celery in the prefork pool, by the heartbeat itself in the solo pool).
_KILL_AFTER_OVERRUN = 5.0
#: Exit status of a solo worker that ended itself because a stage was stuck past its hard limit (EX_SOFTWARE).
OVERRUN_EXIT_CODE = 70


def register_tasks(app: Celery, runtime_factory: Callable[[], Any], settings: Settings | None = None) -> None:
    """Bind one Celery task per stage, with the stage's time limits from `settings` (default: the installed
    runtime's); the stage bodies live in :mod:`dicom_fusion.service.jobs.stages`."""
    settings = settings if settings is not None else runtime_factory().settings
    bodies = {Stage.PREPARE: stages.prepare, Stage.TIMELINE: stages.timeline,
              Stage.INFER: stages.infer, Stage.DELIVER: stages.deliver}
    for stage, body in bodies.items():
        def _task(self: Task, job_id: int, _stage: Stage = stage, _body: Any = body) -> str:
            return run_stage(self, runtime_factory(), int(job_id), _stage, _body)

        # Celery enforces these in the prefork pool only (soft: SoftTimeLimitExceeded in the task; hard: the
        # process is killed). The kill comes a few seconds after the heartbeat's own hard limit, so the
        # overrun is recorded in the ledger first. Solo and threads pools: see `run_stage`.
        soft, hard = settings.stage_time_limits(stage.value)
        app.task(name=TASK_NAMES[stage], bind=True, acks_late=True, reject_on_worker_lost=True,
                 max_retries=None, soft_time_limit=soft, time_limit=hard + _KILL_AFTER_OVERRUN)(_task)


@worker_process_init.connect
def _reset_after_fork(**_: Any) -> None:
    """Prefork children must not share the parent's database connections."""
    reset_after_fork()
