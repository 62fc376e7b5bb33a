"""Study completion: when a receiving study is complete (README "Completeness"), by ``completion.mode``:

- ``quiet``: after ``quiet_seconds`` without a new instance;
- ``release``: when the association that sent it is released (the quiet period stays as a backstop);
- ``pacs``: as soon as the ledger holds the instance counts the ``[pacs]`` node reports over C-FIND
  (``outputs/query.py``), ``settle_seconds`` after the last instance; after ``max_wait_seconds`` when the
  counts never match (proceed with what is there); the quiet period when the PACS does not answer.

In ``pacs`` mode the poll asks the PACS once per receiving study (the listener never waits on it): the
queries run on a small thread pool and the poll reads their answers on its next rounds. A study whose
count reaches the PACS's is asked again before it completes (a PACS still receiving it reports more),
and one whose counts do not match is asked again every ``requery_seconds``. The decision itself is the
pure function :func:`pacs_rule`.

Completing a study creates its job versions in the ledger exactly once (a conditional UPDATE, safe with
several listeners) and enqueues their first stage; the rule that fired ("pacs counts 12/12", "max wait
…", "quiet period (PACS did not answer)") is in the study's and jobs' audit rows. The router
(``service/routing``) decides the jobs first: one job per matching route (which model reads which series;
several when routes say `continue`), or one job recording why the study is ``ignored`` (nothing is
enqueued then). A late instance reopens the study, and the next completion creates new job versions,
never a silent drop.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from functools import partial

from sqlalchemy import func, select

from dicom_fusion.service.config import CompletionSettings, Settings
from dicom_fusion.service.errors import PacsQueryError
from dicom_fusion.service.outputs.dispatch import DicomNode
from dicom_fusion.service.outputs.query import StudyCounts, query_study_counts
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import RouteStudy, Series, Stage, Study, StudyState, utcnow

log = logging.getLogger(__name__)

Enqueue = Callable[[int, Stage], bool | None]  # False: not published (the reaper's check failed)
#: Study Instance UID -> what the PACS holds of it (None: it does not know the study); raises PacsQueryError
AskPacs = Callable[[str], StudyCounts | None]

QUIET_RULE = "quiet period"
RELEASE_RULE = "association release"
NO_ANSWER_RULE = "quiet period (PACS did not answer)"


class PacsAnswer(Enum):
    """Where the C-FIND for one study stands."""

    PENDING = "pending"  # asked, no answer yet (the first query of the study)
    COUNTS = "counts"  # the PACS reported the study's counts
    NONE = "none"  # refused, timed out, failed or no match: the quiet period decides


@dataclass(frozen=True)
class PacsTimers:
    """The pacs-mode timers, in seconds (``completion.*``)."""

    settle: float
    max_wait: float
    quiet: float

    @classmethod
    def of(cls, settings: CompletionSettings) -> PacsTimers:
        return cls(settle=settings.settle_seconds, max_wait=settings.max_wait_seconds,
                   quiet=settings.quiet_seconds)


def counts_met(have_series: Mapping[str, int], have_total: int, expected: StudyCounts) -> bool:
    """Whether the ledger holds at least what the PACS reported: the total and every series it named."""
    return have_total >= expected.total and all(
        have_series.get(uid, 0) >= n for uid, n in expected.series.items())


def pacs_rule(*, answer: PacsAnswer, expected: StudyCounts | None, have_total: int,
              have_series: Mapping[str, int], since_first: float, since_last: float,
              timers: PacsTimers) -> str | None:
    """The completion rule that fires now for a receiving study in ``pacs`` mode, or None to wait.

    ``since_first``: seconds since completion first saw this study receiving; ``since_last``: seconds
    since its last instance. The counts win when they match after ``timers.settle`` quiet seconds; a PACS
    that did not answer leaves it to the quiet period; ``timers.max_wait`` bounds the wait otherwise (the
    study still gets its settle time, so a study still arriving is not cut in the middle of a series).
    """
    if answer is PacsAnswer.NONE:
        return NO_ANSWER_RULE if since_last >= timers.quiet else None
    if since_last < timers.settle:
        return None
    if answer is PacsAnswer.COUNTS and expected is not None and counts_met(have_series, have_total, expected):
        return f"pacs counts {have_total}/{expected.total}"
    if since_first >= timers.max_wait:
        shown = f"{have_total}/{expected.total}" if expected is not None else f"{have_total}/unknown"
        return f"max wait {timers.max_wait:g} s (pacs counts {shown})"
    return None


def pacs_query(settings: Settings) -> AskPacs | None:
    """The C-FIND of the ``[pacs]`` node for ``completion.mode = "pacs"``, or None in the other modes."""
    if settings.completion.mode != "pacs":
        return None
    node = DicomNode(settings.pacs.ae_title, settings.pacs.host, settings.pacs.port)
    return partial(query_study_counts, target=node, calling_ae=settings.pacs.calling_ae_title,
                   timeout=settings.completion.query_timeout_seconds)


@dataclass
class _Waiting:
    """What completion knows of one receiving study in pacs mode (one receiving round)."""

    started: float  # time.monotonic() when the poll first saw it receiving
    query: Future[StudyCounts | None] | None = None
    queried_at: float = 0.0
    queried_with: int = 0  # the ledger's count when the query in flight / last answered was sent
    answer: PacsAnswer = PacsAnswer.PENDING
    expected: StudyCounts | None = None
    reported: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Receiving:
    study_id: int
    study_uid: str
    instances: int
    last_received_at: datetime
    series: dict[str, int]


class Completion:
    def __init__(self, ledger: Ledger, enqueue: Enqueue, *, quiet_seconds: float,
                 route: RouteStudy | None = None, refresh: Callable[[], object] | None = None,
                 ask_pacs: AskPacs | None = None, timers: PacsTimers | None = None,
                 requery_seconds: float = 30.0) -> None:
        self.ledger = ledger
        self.enqueue = enqueue
        self.quiet_seconds = quiet_seconds
        self.route = route  # routing.Router: the jobs' models and series, or why the study is ignored
        # routing.reload.LiveRouter.refresh: reloads the route table when asked (SIGHUP) or when its file
        # changed; called before each completion round, so a new table is in force for the next study.
        self.refresh = refresh
        # pacs mode (``pacs_query``): asked off the poll thread, answers read on the next rounds
        self.ask_pacs = ask_pacs
        self.timers = timers or PacsTimers(settle=2.0, max_wait=600.0, quiet=quiet_seconds)
        self.requery_seconds = requery_seconds
        self._waiting: dict[int, _Waiting] = {}
        self._pool: ThreadPoolExecutor | None = None

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
        """Complete every study whose rule fired (quiet period, or the PACS's counts in pacs mode);
        returns the new job ids."""
        self._refresh_routes()
        if self.ask_pacs is not None:
            return self._poll_pacs()
        cutoff = utcnow() - timedelta(seconds=self.quiet_seconds)
        jobs = self.ledger.complete_studies(quiet_before=cutoff, route=self.route,
                                            note=f"completion: {QUIET_RULE}")
        for job_id in jobs:
            log.info("study complete after quiet period: job %s", job_id)
        return self._start_jobs(jobs)

    def release(self, study_uids: set[str]) -> list[int]:
        """Complete the studies an association sent, right when it is released."""
        self._refresh_routes()
        jobs = self.ledger.complete_studies(quiet_before=None, study_uids=sorted(study_uids), route=self.route,
                                            note=f"completion: {RELEASE_RULE}")
        for job_id in jobs:
            log.info("study complete on association release: job %s", job_id)
        return self._start_jobs(jobs)

    def close(self) -> None:
        """Stop the query pool (queries in flight finish within their timeout, unread)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- pacs mode -------------------------------------------------------------------------------
    def _receiving(self) -> list[_Receiving]:
        with self.ledger.session() as s:
            studies = s.execute(select(Study.id, Study.study_uid, Study.instance_count, Study.last_received_at)
                                .where(Study.state == StudyState.RECEIVING)).all()
            per_series: dict[int, dict[str, int]] = {}
            if studies:
                rows = s.execute(select(Series.study_id, Series.series_uid, func.sum(Series.instance_count))
                                 .where(Series.study_id.in_([row[0] for row in studies]))
                                 .group_by(Series.study_id, Series.series_uid))
                for study_id, series_uid, n in rows:
                    per_series.setdefault(study_id, {})[series_uid] = int(n or 0)
        return [_Receiving(sid, uid, int(n or 0), last, per_series.get(sid, {}))
                for sid, uid, n, last in studies]

    def _ask(self, waiting: _Waiting, study: _Receiving) -> None:
        assert self.ask_pacs is not None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pacs-query")
        waiting.query = self._pool.submit(self.ask_pacs, study.study_uid)
        waiting.queried_at, waiting.queried_with = time.monotonic(), study.instances

    def _read_answer(self, waiting: _Waiting, study: _Receiving) -> None:
        """Take the finished query's answer. A re-query that fails keeps the counts already known."""
        query = waiting.query
        if query is None or not query.done():
            return
        waiting.query = None
        try:
            counts, problem = query.result(), ""
        except PacsQueryError as exc:
            counts, problem = None, str(exc)
        except Exception as exc:  # a bug in the query must not stop completion: the quiet period decides
            counts, problem = None, f"{type(exc).__name__}: {exc}"
        if counts is not None:
            waiting.answer, waiting.expected = PacsAnswer.COUNTS, counts
            return
        if waiting.answer is PacsAnswer.COUNTS:  # a re-query: keep what the PACS said before
            self._report(waiting, study, "requery", "study %s: PACS re-query gave no answer (%s); keeping its "
                         "earlier counts", study.study_id, problem or "no match")
            return
        waiting.answer = PacsAnswer.NONE
        self._report(waiting, study, "none", "study %s: the PACS did not answer the C-FIND (%s): completion by "
                     "the quiet period (%g s)", study.study_id, problem or "study not found", self.quiet_seconds)

    @staticmethod
    def _report(waiting: _Waiting, study: _Receiving, key: str, message: str, *args: object) -> None:
        """Log once per study and receiving round (no patient data: the ledger's study id)."""
        if key not in waiting.reported:
            waiting.reported.add(key)
            log.warning(message, *args)

    def _wants_requery(self, waiting: _Waiting, study: _Receiving) -> bool:
        if waiting.query is not None or waiting.answer is not PacsAnswer.COUNTS or waiting.expected is None:
            return False
        if counts_met(study.series, study.instances, waiting.expected):
            # our count reached the PACS's: ask once more with it, in case the PACS is still receiving
            return waiting.queried_with < waiting.expected.total
        return time.monotonic() - waiting.queried_at >= self.requery_seconds

    def _poll_pacs(self) -> list[int]:
        receiving = self._receiving()
        for gone in set(self._waiting) - {study.study_id for study in receiving}:
            del self._waiting[gone]
        now_mono, now = time.monotonic(), utcnow()
        started: list[int] = []
        for study in receiving:
            waiting = self._waiting.get(study.study_id)
            if waiting is None:
                waiting = self._waiting[study.study_id] = _Waiting(started=now_mono)
                self._ask(waiting, study)
            self._read_answer(waiting, study)
            if self._wants_requery(waiting, study):
                self._ask(waiting, study)
            if waiting.query is not None and waiting.answer is PacsAnswer.COUNTS:
                continue  # a re-query in flight: its answer may still grow the expected counts
            rule = pacs_rule(answer=waiting.answer, expected=waiting.expected, have_total=study.instances,
                             have_series=study.series, since_first=now_mono - waiting.started,
                             since_last=(now - study.last_received_at).total_seconds(), timers=self.timers)
            if rule is None:
                continue
            jobs = self.ledger.complete_studies(quiet_before=None, study_uids=[study.study_uid], route=self.route,
                                                note=f"completion: {rule}")
            self._waiting.pop(study.study_id, None)
            if rule.startswith("max wait"):
                log.warning("study %s: the PACS's counts never matched; completed after the maximum wait (%s)",
                            study.study_id, rule)
            for job_id in jobs:
                log.info("study complete (%s): job %s", rule, job_id)
            started += self._start_jobs(jobs)
        return started


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
