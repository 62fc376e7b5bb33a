"""The Celery app, which queue runs each stage, and the one function that enqueues a stage.

Tasks carry a job id only; the tasks themselves (claim, run, advance) are bound by
:mod:`dicom_fusion.service.jobs.worker`. Importing this module imports neither torch nor the stage
bodies: the listener process, the API and the reaper use it to enqueue.

Priorities (README "Routing", "Priority"). Each stage queue exists once per priority: ``cpu.urgent``,
``cpu`` (normal), ``cpu.background`` (and the same for ``gpu`` and ``io``); a job's messages go to its
priority's queue at every stage. A worker consumes its queues *in order*, every time it takes a message:
all urgent queues first, then the normal ones, then background (:func:`consume_order`). Celery itself
does not: both kombu transports used here cycle round-robin over a consumer's queues, so

- Redis: ``queue_order_strategy = "priority"`` (kombu's fixed-order cycle): each BRPOP names the keys in
  consume order and Redis pops from the first non-empty one;
- the embedded filesystem broker (which knows no priorities at all): :class:`InOrderFilesystemTransport`,
  whose channel tries its queues from the first on every poll instead of resuming after the last one used;

and ``worker_prefetch_multiplier = 1`` with ``acks_late``: a worker holds at most ``concurrency`` messages
(the ones it runs), so what it takes next is chosen when a slot frees, not when an earlier message was
prefetched. tests/integration/test_priority_queues.py checks the order on both brokers.
"""
from __future__ import annotations

from collections.abc import Sequence
from queue import Empty
from typing import Any

from celery import Celery
from kombu import Queue
from kombu.transport import filesystem
from kombu.utils.scheduling import FairCycle

from dicom_fusion.service.config import Settings
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Priority, Stage

STAGE_QUEUE = {Stage.PREPARE: "cpu", Stage.TIMELINE: "io", Stage.INFER: "gpu", Stage.DELIVER: "io"}
TASK_NAMES = {stage: f"dicom_fusion.{stage.value}" for stage in STAGE_QUEUE}
BASE_QUEUES = ("cpu", "gpu", "io")
PRIORITY_ORDER = (Priority.URGENT, Priority.NORMAL, Priority.BACKGROUND)
# Within one priority a worker takes the later stages first (deliver/timeline, infer, then prepare), so the
# jobs it started finish before it starts new ones: results come out in arrival order, one by one, instead
# of every queued study being prepared before the first is delivered.
_DEPTH_FIRST = {"io": 0, "gpu": 1, "cpu": 2}


def queue_name(base: str, priority: Priority | str) -> str:
    """The queue of `base` (cpu, gpu, io) for `priority`: normal keeps the plain name (``cpu``), the others
    get a suffix (``cpu.urgent``, ``cpu.background``)."""
    priority = Priority(priority)
    return base if priority == Priority.NORMAL else f"{base}.{priority.value}"


def stage_queue(stage: Stage, priority: Priority | str = Priority.NORMAL) -> str:
    """The queue a job of `priority` waits in for `stage`."""
    return queue_name(STAGE_QUEUE[stage], priority)


def priority_queues(base: str) -> tuple[str, ...]:
    """Every queue of `base`, urgent first (queue depths add them up)."""
    return tuple(queue_name(base, p) for p in PRIORITY_ORDER)


def _split(name: str) -> tuple[str, Priority | None]:
    """``cpu.urgent`` -> (cpu, urgent); ``cpu`` -> (cpu, None: every priority)."""
    base, _, suffix = name.rpartition(".")
    if base and suffix in (Priority.URGENT.value, Priority.BACKGROUND.value):
        return base, Priority(suffix)
    return name, None


def consume_order(queues: Sequence[str]) -> list[str]:
    """The queues a worker started for `queues` (``worker.queues``: base names) consumes, in the order it
    takes messages: the urgent queue of each, then the normal, then the background; within a priority the
    later stages first (io, gpu, cpu; other names after them, as given). A name that already names a
    priority (``cpu.urgent``) is taken alone: a worker for urgent jobs only."""
    entries: list[tuple[int, int, int, str]] = []
    for index, name in enumerate(dict.fromkeys(q.strip() for q in queues if q.strip())):
        base, only = _split(name)
        rank = _DEPTH_FIRST.get(base, len(_DEPTH_FIRST))
        for level, priority in enumerate(PRIORITY_ORDER):
            if only is None or only == priority:
                entries.append((level, rank, index, queue_name(base, priority)))
    return [q for *_, q in sorted(entries)]


class _InOrderCycle(FairCycle):
    """kombu's FairCycle resumes after the resource it used last (round-robin); this one starts from the
    first every time, so the first non-empty queue in consume order gives the next message."""

    def get(self, callback: Any, **kwargs: Any) -> Any:
        self.pos = 0
        return super().get(callback, **kwargs)


class _InOrderChannel(filesystem.Channel):
    def _reset_cycle(self) -> None:
        self._cycle = _InOrderCycle(self._get_and_deliver, self._active_queues, Empty)


class InOrderFilesystemTransport(filesystem.Transport):
    """kombu's filesystem transport, its queues polled in consume order (see the module docstring)."""

    Channel = _InOrderChannel


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
        task_queues=[Queue(q) for base in BASE_QUEUES for q in priority_queues(base)],
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
        conf["broker_transport"] = f"{__name__}:InOrderFilesystemTransport"
    else:
        conf["broker_transport_options"] = {
            "visibility_timeout": settings.broker.visibility_timeout,
            "polling_interval": settings.broker.polling_interval,
            "queue_order_strategy": "priority",  # BRPOP names the queues in consume order, every time
        }
    app.conf.update(conf)
    return app


def enqueue(app: Celery, ledger: Ledger, settings: Settings, job_id: int, stage: Stage,
            *, requeue: bool = False, expired_only: bool = False) -> bool:
    """Mark the job queued in the ledger *then* publish (to its priority's queue), so a fast worker never
    races the mark. ``expired_only`` (the reaper): only while the job's lease is still expired, so two
    reapers (two `serve` processes) publish one message per expiry, not two (``Ledger.mark_enqueued``).
    Returns whether a message was published."""
    priority = ledger.mark_enqueued(job_id, stage=stage, lease_seconds=settings.worker.queued_lease_seconds,
                                    requeue=requeue, expired_only=expired_only)
    if priority is None:
        return False
    publish(app, job_id, stage, priority)
    return True


def publish(app: Celery, job_id: int, stage: Stage, priority: Priority | str = Priority.NORMAL) -> None:
    """Send the stage's task message to the stage's queue for the job's priority (the ledger row must
    already say queued)."""
    app.send_task(TASK_NAMES[stage], args=[job_id], queue=stage_queue(stage, priority))
