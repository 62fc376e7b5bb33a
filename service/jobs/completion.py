"""Study completion: a study is complete after a quiet period with no new instance (or, with
``completion.on_release``, when the association that sent it is released).

Completing a study creates its job versions in the ledger exactly once (a conditional UPDATE, safe with
several listeners) and enqueues their first stage. The router (``service/routing``) decides them first:
one job per matching route (which model reads which series; several when routes say `continue`), or one
job recording why the study is ``ignored`` (nothing is enqueued then). A late instance reopens the study,
and the next completion creates new job versions, never a silent drop.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from datetime import timedelta

from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import RouteStudy, Stage, utcnow

log = logging.getLogger(__name__)

Enqueue = Callable[[int, Stage], None]


class Completion:
    def __init__(self, ledger: Ledger, enqueue: Enqueue, *, quiet_seconds: float,
                 route: RouteStudy | None = None, refresh: Callable[[], object] | None = None) -> None:
        self.ledger = ledger
        self.enqueue = enqueue
        self.quiet_seconds = quiet_seconds
        self.route = route  # routing.Router: the jobs' models and series, or why the study is ignored
        # routing.reload.LiveRouter.refresh: reloads the route table when asked (SIGHUP) or when its file
        # changed; called before each completion round, so a new table is in force for the next study.
        self.refresh = refresh

    def _refresh_routes(self) -> None:
        if self.refresh is None:
            return
        try:
            self.refresh()
        except Exception as exc:  # a reload problem never stops completion: the old routes stay in force
            log.error("route table reload failed: %s: %s", type(exc).__name__, exc)

    def _start_jobs(self, job_ids: Iterable[int]) -> list[int]:
        started = []
        for job_id in job_ids:
            try:
                self.enqueue(job_id, Stage.PREPARE)
                started.append(job_id)
            except Exception as exc:  # the reaper retries jobs left in state `complete`
                log.error("job %s created but not enqueued: %s", job_id, exc)
        return started

    def poll(self) -> list[int]:
        """Complete every study quiet for ``quiet_seconds``; returns the new job ids."""
        self._refresh_routes()
        cutoff = utcnow() - timedelta(seconds=self.quiet_seconds)
        jobs = self.ledger.complete_studies(quiet_before=cutoff, route=self.route)
        for job_id in jobs:
            log.info("study complete after quiet period: job %s", job_id)
        return self._start_jobs(jobs)

    def release(self, study_uids: set[str]) -> list[int]:
        """Complete the studies an association sent, right when it is released."""
        self._refresh_routes()
        jobs = self.ledger.complete_studies(quiet_before=None, study_uids=sorted(study_uids), route=self.route)
        for job_id in jobs:
            log.info("study complete on association release: job %s", job_id)
        return self._start_jobs(jobs)


class PeriodicThread(threading.Thread):
    """Runs ``fn`` every ``interval`` seconds until stopped; an exception is logged, never fatal."""

    def __init__(self, name: str, interval: float, fn: Callable[[], object]) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self.fn = fn
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.fn()
            except Exception as exc:
                log.error("%s failed: %s: %s", self.name, type(exc).__name__, exc)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
