"""The route decision of a completing study, in the form the ledger records (one :class:`JobRoute` per job
to create, or the reason the study is ignored). Built from the settings; `serve` refuses to start when the
route table is invalid and swaps in a new one on reload (:mod:`.reload`)."""
from __future__ import annotations

import logging

import regex
from sqlalchemy import func, select

from dicom_fusion.service.config import Settings
from dicom_fusion.service.routing.headers import headers_from_ledger
from dicom_fusion.service.routing.routes import RouteTable, load_routes, phantom_pattern
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Instance, Job, JobRoute, Priority, ReleaseMode, Series

log = logging.getLogger(__name__)


class Router:
    """Study id → the jobs its matching routes ask for (one per route, in route order), or why it is ignored."""

    def __init__(self, table: RouteTable, ledger: Ledger, *, phantom: regex.Pattern[str] | None = None,
                 timeout: float = 0.05, rerun: bool = False, release: ReleaseMode = ReleaseMode.AUTO) -> None:
        self.table = table
        self.ledger = ledger
        self.phantom = phantom
        self.timeout = timeout
        # False (study completion): a study reopened only by instances the model does not read (our SR
        # looped back by the PACS, a KO, a dose report) gets no second result. True (operator replay):
        # run again whatever arrived.
        self.rerun = rerun
        self.release = release  # the global `release.mode`, for routes that do not name one

    @classmethod
    def from_settings(cls, settings: Settings, ledger: Ledger, *, rerun: bool = False) -> Router:
        """Raises :class:`~.routes.RouteError` (a ConfigError) naming the file, route and field."""
        return cls(load_routes(settings), ledger, phantom=phantom_pattern(settings),
                   timeout=settings.routing.regex_timeout_ms / 1000.0, rerun=rerun,
                   release=ReleaseMode(settings.release.mode))

    def __call__(self, study_id: int) -> tuple[JobRoute, ...] | str:
        header = headers_from_ledger(self.ledger, study_id, phantom_pattern=self.phantom, timeout=self.timeout)
        decision = self.table.decide(header)
        if decision.ignored is not None:
            log.info("study %s ignored: %s", study_id, decision.ignored)
            return decision.ignored
        jobs: list[JobRoute] = []
        unchanged: list[str] = []
        for plan in decision.plans:
            why = None if self.rerun else self._unchanged_since(study_id, plan.route, plan.series_uids)
            if why is not None:
                unchanged.append(why)
                continue
            log.info("study %s routed: route %s, model %s, %d series, priority %s", study_id, plan.route,
                     plan.model, len(plan.series_uids), plan.priority)
            jobs.append(JobRoute(route=plan.route, card_path=str(plan.card_path), model=plan.model,
                                 series_uids=plan.series_uids,
                                 release=ReleaseMode(plan.release) if plan.release else self.release,
                                 priority=Priority(plan.priority)))
        if not jobs:  # every matching route has read all of this study already
            reason = "; ".join(unchanged)
            log.info("study %s ignored: %s", study_id, reason)
            return reason[:2000]
        return tuple(jobs)

    def _unchanged_since(self, study_id: int, route: str, series_uids: tuple[str, ...]) -> str | None:
        """Why a reopened study needs no new job on `route`: the route took it before and no instance of the
        series it reads arrived since that job; None when there is something new to read (or the route
        never took the study). Asked per route, so a study on two routes is judged for each."""
        with self.ledger.session() as s:
            prev = s.scalars(select(Job).where(Job.study_id == study_id, Job.route == route)
                             .order_by(Job.version.desc()).limit(1)).first()
            if prev is None:
                return None
            new = s.scalar(select(func.count(Instance.id)).join(Series, Series.id == Instance.series_id)
                           .where(Instance.study_id == study_id, Series.series_uid.in_(list(series_uids)),
                                  Instance.received_at >= prev.created_at))
        if new:
            return None
        return (f"nothing new for route {route}: no instance of the series it reads arrived since job "
                f"v{prev.version} (the new instances are not read by it)")
