"""The lease reaper: the ledger, not the broker, decides that a job must run again.

A job whose lease expired was held by a worker that died (kill -9, OOM, node lost) or was sent as a
message the broker lost (the filesystem and SQLite transports never redeliver). The reaper enqueues
the job's current stage again; claims in the ledger make a duplicate message harmless.
"""
from __future__ import annotations

import logging

from dicom_fusion.service.jobs.completion import Enqueue
from dicom_fusion.service.storage.ledger import Ledger

log = logging.getLogger(__name__)


def reap(ledger: Ledger, enqueue_again: Enqueue) -> int:
    """Re-enqueue every job with an expired lease; returns how many were re-enqueued."""
    n = 0
    for job_id, stage in ledger.expired_jobs():
        try:
            enqueue_again(job_id, stage)
            n += 1
            log.warning("job %s: lease expired at stage %s, re-enqueued", job_id, stage)
        except Exception as exc:
            log.error("job %s: re-enqueue failed: %s", job_id, exc)
    return n
