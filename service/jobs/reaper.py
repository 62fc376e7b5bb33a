"""The lease reaper: the ledger, not the broker, decides that a job must run again.

A job whose lease expired was held by a worker that died (kill -9, OOM, node lost) or was sent as a
message the broker lost (the filesystem and SQLite transports never redeliver). The reaper enqueues
the job's current stage again; claims in the ledger make a duplicate message harmless.

A dead worker need not wait for its leases to run out: every lease owner is ``"host:pid:task"``, so
when `serve` sees its embedded worker exit it releases that pid's leases at once
(:func:`release_dead_worker`), and a worker that starts releases those of earlier processes on its host
that no longer run (:func:`release_left_by_earlier_workers`); both then reap as above.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from dicom_fusion.service.jobs.completion import Enqueue
from dicom_fusion.service.storage.ledger import Ledger

log = logging.getLogger(__name__)


def reap(ledger: Ledger, enqueue_again: Enqueue) -> int:
    """Re-enqueue every job with an expired lease; returns how many were re-enqueued.

    The list is stale as soon as it is read (another `serve` process reaps the same ledger), so
    ``enqueue_again`` must re-check each job in the ledger (``enqueue(..., expired_only=True)``); it
    returns False for a job someone else re-enqueued or claimed since, which is skipped here."""
    n = 0
    for job_id, stage in ledger.expired_jobs():
        try:
            if enqueue_again(job_id, stage) is False:
                log.info("job %s: stage %s already re-enqueued or claimed elsewhere; skipped", job_id, stage)
                continue
            n += 1
            log.warning("job %s: lease expired at stage %s, re-enqueued", job_id, stage)
        except Exception as exc:
            log.error("job %s: re-enqueue failed: %s", job_id, exc)
    return n


def owner_prefix(pid: int, host: str | None = None) -> str:
    """The ``"host:pid:"`` every lease taken by that worker process starts with (``worker.run_stage``)."""
    return f"{host or socket.gethostname()}:{pid}:"


def release_dead_worker(ledger: Ledger, enqueue_again: Enqueue, pid: int, host: str | None = None) -> list[int]:
    """A worker process is known to be dead (``serve`` saw its child exit): expire its leases now and
    re-enqueue those jobs, instead of waiting ``worker.lease_seconds`` for the lease to run out.
    Returns the released job ids."""
    released = ledger.release_leases(owner_prefix(pid, host))
    if released:
        log.warning("worker %s died holding job(s) %s: leases released", pid, ", ".join(map(str, released)))
        reap(ledger, enqueue_again)
    return released


def pid_alive(pid: int) -> bool:
    """True while a process with that id exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): trust kill(0)
    return state not in ("Z", "X")


def release_left_by_earlier_workers(ledger: Ledger, enqueue_again: Enqueue, *, host: str | None = None,
                                    alive: Callable[[int], bool] = pid_alive) -> list[int]:
    """A worker starting on ``host`` releases (and re-enqueues) the leases of earlier worker processes
    on the same host that no longer run: a `serve` or container restarted after kill -9 finds its
    jobs again at once. A lease whose pid is this process's own is an earlier incarnation's (we hold
    none yet; containers reuse pids). A pid that is alive is left alone: it may be another worker."""
    host = host or socket.gethostname()
    released: list[int] = []
    for prefix in sorted(ledger.lease_owner_prefixes(host)):
        try:
            pid = int(prefix.split(":")[1])
        except ValueError:
            continue
        if pid == os.getpid() or not alive(pid):
            released += ledger.release_leases(prefix)
    if released:
        log.warning("leases of job(s) %s left by earlier worker processes on %s released",
                    ", ".join(map(str, released)), host)
        reap(ledger, enqueue_again)
    return released
