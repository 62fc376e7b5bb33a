"""The Celery app, which queue runs each stage, and the one function that enqueues a stage.

Tasks carry a job id only; the tasks themselves (claim, run, advance) are bound by
:mod:`dicom_fusion.service.jobs.worker`. Importing this module imports neither torch nor the stage
bodies: the listener process, the API and the reaper use it to enqueue.
"""
from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from dicom_fusion.service.config import Settings
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Stage

STAGE_QUEUE = {Stage.PREPARE: "cpu", Stage.TIMELINE: "io", Stage.INFER: "gpu", Stage.DELIVER: "io"}
TASK_NAMES = {stage: f"dicom_fusion.{stage.value}" for stage in STAGE_QUEUE}


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
    publish(app, job_id, stage)


def publish(app: Celery, job_id: int, stage: Stage) -> None:
    """Send the stage's task message to the stage's queue (the ledger row must already say queued)."""
    app.send_task(TASK_NAMES[stage], args=[job_id], queue=STAGE_QUEUE[stage])
