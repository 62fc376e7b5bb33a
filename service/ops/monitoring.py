"""Read models for operators, built from the ledger (+ the broker for queue depths).

One function per view, shared by the REST API, the dashboard, ``dicom-fusion status`` and the
Prometheus collector. Everything returned is UIDs, counts, states, timestamps and failure reasons:
the ledger holds no patient names, IDs or birth dates, and nothing here reads the DICOM files.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import Select, case, func, select

from dicom_fusion.service.config import Settings
from dicom_fusion.service.errors import BrokerError, StudyNotFoundError
from dicom_fusion.service.jobs.queues import STAGE_QUEUE
from dicom_fusion.service.ops.broker import QUEUES, broker_kind, queue_depths
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import (
    QUEUED_OWNER,
    TERMINAL,
    AuditEvent,
    Delivery,
    Instance,
    Job,
    JobState,
    Series,
    Stage,
    Study,
    StudyState,
    utcnow,
)
from dicom_fusion.service.storage.spool import SpoolSpace, spool_space

RECEIVING = "receiving"
#: Every state a study can show: still receiving, or the state of its current job (see STATE_PRECEDENCE).
STUDY_STATES = (RECEIVING, *(s.value for s in JobState))
#: A study shows the state of its current job: its latest completion or replay creates one job per route
#: that took it (routes with `continue`), all with one `created_at`. With several, the study shows the
#: first state in this order (then the lowest version): whatever needs an operator (dead, failed), then
#: the least advanced job still running, then a result waiting for a reviewer, then the finished ones.
#: So a study is `done` only when all its current jobs are done, and `dead` when any of them is.
STATE_PRECEDENCE = (JobState.DEAD, JobState.FAILED, JobState.COMPLETE, JobState.QUEUED, JobState.PREPARING,
                    JobState.INFERRING, JobState.DELIVERING, JobState.AWAITING_REVIEW, JobState.REJECTED,
                    JobState.DONE, JobState.IGNORED)
_TERMINAL = [str(t) for t in TERMINAL]
_QUEUED_STAGES = {s.value for s in STAGE_QUEUE}


# ---- queues ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueueStatus:
    name: str
    depth: int | None  # messages waiting in the broker; None when the broker could not be read
    waiting: int  # jobs the ledger has handed to this queue and no worker has claimed yet
    in_flight: int  # jobs a worker holds a lease on
    oldest_waiting_seconds: float | None


@dataclass(frozen=True)
class QueueOverview:
    broker: str
    broker_error: str | None
    queues: tuple[QueueStatus, ...]
    workers: tuple[str, ...] | None = None  # None: unknown (no remote control, or not asked)


def queue_overview(ledger: Ledger, settings: Settings, *, now: datetime | None = None) -> QueueOverview:
    now = now or utcnow()
    error = None
    try:
        depths = {q: d.depth for q, d in queue_depths(settings).items()}
    except BrokerError as exc:
        depths, error = {}, str(exc)
    waiting: dict[str, int] = defaultdict(int)
    running: dict[str, int] = defaultdict(int)
    oldest: dict[str, datetime] = {}
    with ledger.session() as s:
        rows = s.execute(select(Job.stage, Job.lease_owner, Job.updated_at)
                         .where(Job.state.not_in(_TERMINAL))).all()
    for stage, owner, updated in rows:
        if stage not in _QUEUED_STAGES:
            continue
        q = STAGE_QUEUE[Stage(stage)]
        if owner is None or owner == QUEUED_OWNER:  # created, queued, or backing off before a retry
            waiting[q] += 1
            oldest[q] = min(oldest.get(q, updated), updated)
        else:
            running[q] += 1
    queues = tuple(QueueStatus(q, depths.get(q), waiting[q], running[q],
                               (now - oldest[q]).total_seconds() if q in oldest else None) for q in QUEUES)
    return QueueOverview(broker=broker_kind(settings), broker_error=error, queues=queues)


# ---- studies ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    state: str
    instances: int
    first_received_at: datetime
    last_received_at: datetime
    job_version: int
    stage: str | None
    finding: str | None
    probability: float | None
    error: str | None  # the failure reason; for an ignored study, why it was ignored
    updated_at: datetime | None
    route: str = ""  # the routes its current jobs took, comma-separated ("" = ignored, or before routing)
    model: str = ""  # "name version" of those routes' models, in the same order


@dataclass(frozen=True)
class StudyPage:
    items: tuple[StudyRow, ...]
    total: int
    page: int
    page_size: int


def _current_jobs() -> Select:  # type: ignore[type-arg]
    """Each study's current jobs: those created with its newest job (same completion or replay)."""
    latest = select(Job.study_id, func.max(Job.version).label("version")).group_by(Job.study_id).subquery()
    newest = select(Job.study_id, Job.created_at).join(
        latest, (Job.study_id == latest.c.study_id) & (Job.version == latest.c.version)).subquery()
    return select(Job).join(newest, (Job.study_id == newest.c.study_id) & (Job.created_at == newest.c.created_at))


def _latest_jobs() -> Select:  # type: ignore[type-arg]
    """One job per study: the current job whose state the study shows (STATE_PRECEDENCE)."""
    cur = _current_jobs().subquery()
    rank = case({s.value: i for i, s in enumerate(STATE_PRECEDENCE)}, value=cur.c.state,
                else_=len(STATE_PRECEDENCE))
    ranked = select(cur, func.row_number().over(partition_by=cur.c.study_id, order_by=(rank, cur.c.version))
                    .label("precedence")).subquery()
    return select(*(ranked.c[c.name] for c in Job.__table__.columns)).where(ranked.c.precedence == 1)


def _routes_of(s, study_ids: list[int]) -> dict[int, tuple[str, str]]:  # type: ignore[no-untyped-def]
    """Study id -> (routes, models) of its current jobs, comma-separated in version order."""
    cur = _current_jobs().subquery()
    found: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for sid, route, model in s.execute(select(cur.c.study_id, cur.c.route, cur.c.model)
                                       .where(cur.c.study_id.in_(study_ids)).order_by(cur.c.version)):
        if route or model:
            found[sid].append((route or "", model or ""))
    return {sid: (", ".join(r for r, _ in v), ", ".join(m for _, m in v)) for sid, v in found.items()}


def _study_state_expr():  # type: ignore[no-untyped-def]
    latest = _latest_jobs().subquery()
    state = case((Study.state == StudyState.RECEIVING, RECEIVING), else_=func.coalesce(latest.c.state, RECEIVING))
    return latest, state


def list_studies(ledger: Ledger, *, state: str | None = None, received_after: datetime | None = None,
                 received_before: datetime | None = None, page: int = 1, page_size: int = 50) -> StudyPage:
    """Studies, most recently received first; ``state`` is ``receiving`` or the latest job's state."""
    if state is not None and state not in STUDY_STATES:
        raise ValueError(f"unknown state {state!r}; one of {', '.join(STUDY_STATES)}")
    if page < 1 or not 1 <= page_size <= 500:
        raise ValueError("page starts at 1 and page_size is 1..500")
    latest, state_expr = _study_state_expr()
    q = select(Study, latest.c.stage, latest.c.finding, latest.c.probability, latest.c.error,
               latest.c.updated_at, state_expr.label("effective_state"), latest.c.route, latest.c.model) \
        .outerjoin(latest, latest.c.study_id == Study.id)
    if state is not None:
        q = q.where(state_expr == state)
    if received_after is not None:
        q = q.where(Study.last_received_at >= received_after)
    if received_before is not None:
        q = q.where(Study.last_received_at < received_before)
    with ledger.session() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
        rows = s.execute(q.order_by(Study.last_received_at.desc(), Study.id.desc())
                         .offset((page - 1) * page_size).limit(page_size)).all()
        routes = _routes_of(s, [r[0].id for r in rows])
    items = tuple(StudyRow(study_uid=st.study_uid, state=eff, instances=st.instance_count,
                           first_received_at=st.first_received_at, last_received_at=st.last_received_at,
                           job_version=st.job_version, stage=stage, finding=finding, probability=prob,
                           error=err, updated_at=upd, route=routes.get(st.id, ("", ""))[0],
                           model=routes.get(st.id, ("", ""))[1])
                  for st, stage, finding, prob, err, upd, eff, _route, _model in rows)
    return StudyPage(items=items, total=int(total), page=page, page_size=page_size)


def studies_by_state(ledger: Ledger) -> dict[str, int]:
    """How many studies show each state (zero-filled, in pipeline order)."""
    latest, state_expr = _study_state_expr()
    q = select(state_expr, func.count()).select_from(Study).outerjoin(latest, latest.c.study_id == Study.id) \
        .group_by(state_expr)
    with ledger.session() as s:
        found = {str(k): int(n) for k, n in s.execute(q)}
    return {st: found.get(st, 0) for st in STUDY_STATES}


@dataclass(frozen=True)
class AuditEntry:
    ts: datetime
    event: str
    detail: str


@dataclass(frozen=True)
class DeliveryInfo:
    kind: str
    state: str
    attempts: int
    target: str
    remote_id: str | None
    last_error: str | None
    delivered_at: datetime | None


@dataclass(frozen=True)
class JobInfo:
    job_id: int
    version: int
    state: str
    stage: str
    attempts: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    finding: str | None
    probability: float | None
    image_only: bool | None
    sr_uid: str | None
    deliveries: tuple[DeliveryInfo, ...]
    history: tuple[AuditEntry, ...]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    route: str = ""  # the route that matched ("" = ignored: `error` says why)
    model: str = ""  # "name version" of the route's model
    series_uids: tuple[str, ...] = ()  # the series the model reads (() = all, before routing)

    @property
    def latency_seconds(self) -> float | None:
        return (self.finished_at - self.created_at).total_seconds() if self.finished_at else None

    @property
    def report_id(self) -> str | None:
        return next((d.remote_id for d in self.deliveries if d.kind == "report" and d.remote_id), None)


@dataclass(frozen=True)
class SeriesInfo:
    series_uid: str
    modality: str
    instances: int


@dataclass(frozen=True)
class StudyDetail:
    study_uid: str
    state: str
    instances: int
    bytes: int
    first_received_at: datetime
    last_received_at: datetime
    calling_ae: str
    series: tuple[SeriesInfo, ...]
    jobs: tuple[JobInfo, ...]  # newest version first

    @property
    def errors(self) -> list[str]:
        """Every failure reason on record, newest job first, without repeats."""
        seen: list[str] = []
        for job in self.jobs:
            reasons = [job.error] + [d.last_error for d in job.deliveries] + \
                [e.detail for e in job.history if e.event in (JobState.FAILED, JobState.DEAD)]
            for r in reasons:
                if r and r not in seen:
                    seen.append(r)
        return seen


def stage_durations(history: tuple[AuditEntry, ...]) -> dict[str, float]:
    """Seconds each stage ran, from the claim audit row to the next ``stage_done``/``done`` row."""
    out: dict[str, float] = {}
    started: tuple[str, datetime] | None = None
    for e in history:
        if e.detail.startswith("stage=") and " owner=" in e.detail:
            started = (e.detail.split()[0].split("=", 1)[1], e.ts)
        elif e.event in ("stage_done", JobState.DONE) and started is not None:
            out[started[0]] = out.get(started[0], 0.0) + (e.ts - started[1]).total_seconds()
            started = None
    return out


def study_detail(ledger: Ledger, study_uid: str) -> StudyDetail:
    """Everything the ledger knows about one study. Raises :class:`StudyNotFoundError`."""
    with ledger.session() as s:
        study = s.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            raise StudyNotFoundError(f"no study {study_uid} in the ledger")
        size = s.scalar(select(func.coalesce(func.sum(Instance.size), 0)).where(Instance.study_id == study.id))
        series = tuple(SeriesInfo(r.series_uid, r.modality, r.instance_count) for r in s.scalars(
            select(Series).where(Series.study_id == study.id).order_by(Series.id)))
        jobs = list(s.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.version.desc())))
        job_ids = [j.id for j in jobs]
        deliveries: dict[int, list[DeliveryInfo]] = defaultdict(list)
        for d in s.scalars(select(Delivery).where(Delivery.job_id.in_(job_ids)).order_by(Delivery.kind)):
            deliveries[d.job_id].append(DeliveryInfo(d.kind, d.state, d.attempts, d.target, d.remote_id,
                                                     d.last_error, d.delivered_at))
        history: dict[int, list[AuditEntry]] = defaultdict(list)
        for a in s.scalars(select(AuditEvent).where(AuditEvent.entity == "job", AuditEvent.entity_id.in_(job_ids))
                           .order_by(AuditEvent.id)):
            history[a.entity_id].append(AuditEntry(a.ts, a.event, a.detail))
    infos = []
    for j in jobs:
        h = tuple(history[j.id])
        infos.append(JobInfo(job_id=j.id, version=j.version, state=j.state, stage=j.stage, attempts=j.attempts,
                             error=j.error, created_at=j.created_at, updated_at=j.updated_at,
                             finished_at=j.finished_at, finding=j.finding, probability=j.probability,
                             image_only=j.image_only, sr_uid=j.sr_uid, deliveries=tuple(deliveries[j.id]),
                             history=h, stage_seconds=stage_durations(h), route=j.route, model=j.model,
                             series_uids=tuple(json.loads(j.series_uids)) if j.series_uids else ()))
    current = [j for j in infos if infos and j.created_at == infos[0].created_at]  # latest completion's jobs
    state = RECEIVING if study.state == StudyState.RECEIVING or not infos else \
        min(current, key=lambda j: (_precedence(j.state), j.version)).state
    return StudyDetail(study_uid=study.study_uid, state=state, instances=study.instance_count, bytes=int(size or 0),
                       first_received_at=study.first_received_at, last_received_at=study.last_received_at,
                       calling_ae=study.calling_ae, series=series, jobs=tuple(infos))


def _precedence(state: str) -> int:
    order = [s.value for s in STATE_PRECEDENCE]
    return order.index(state) if state in order else len(order)


# ---- activity: throughput, latency, failures --------------------------------------------------
@dataclass(frozen=True)
class Bucket:
    start: datetime
    instances: int
    done: int
    dead: int


@dataclass(frozen=True)
class Latency:
    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None


@dataclass(frozen=True)
class Failure:
    study_uid: str
    version: int
    state: str
    stage: str
    attempts: int
    error: str
    updated_at: datetime


def latency(ledger: Ledger, *, since: datetime) -> Latency:
    """End-to-end job latency (job created at study completion → done) of jobs finished since ``since``."""
    with ledger.session() as s:
        rows = s.execute(select(Job.created_at, Job.finished_at).where(
            Job.state == JobState.DONE, Job.finished_at >= since)).all()
    if not rows:
        return Latency(count=0, p50=None, p90=None, p99=None, max=None)
    values = np.array([(f - c).total_seconds() for c, f in rows])
    p50, p90, p99 = (float(v) for v in np.percentile(values, [50, 90, 99]))  # linear interpolation
    return Latency(count=len(values), p50=p50, p90=p90, p99=p99, max=float(values.max()))


def throughput(ledger: Ledger, *, now: datetime | None = None, window: timedelta = timedelta(hours=1),
               buckets: int = 12) -> tuple[Bucket, ...]:
    """Instances received and jobs finished (done / dead) per time bucket over ``window``."""
    now = now or utcnow()
    start = now - window
    width = window / buckets
    inst = [0] * buckets
    done = [0] * buckets
    dead = [0] * buckets

    def index(ts: datetime) -> int:
        return min(int((ts - start) / width), buckets - 1)

    with ledger.session() as s:
        for (ts,) in s.execute(select(Instance.received_at).where(Instance.received_at >= start)):
            inst[index(ts)] += 1
        for state, ts in s.execute(select(Job.state, Job.finished_at).where(
                Job.finished_at >= start, Job.state.in_(_TERMINAL))):
            if state == JobState.DONE:
                done[index(ts)] += 1
            elif state == JobState.DEAD:  # ignored studies are neither: nothing was meant to run
                dead[index(ts)] += 1
    return tuple(Bucket(start + width * i, inst[i], done[i], dead[i]) for i in range(buckets))


def recent_failures(ledger: Ledger, *, limit: int = 10,
                    states: tuple[JobState, ...] = (JobState.FAILED, JobState.DEAD)) -> tuple[Failure, ...]:
    """Latest jobs that are failing (retrying) or dead, with their reasons."""
    with ledger.session() as s:
        rows = s.execute(select(Job, Study.study_uid).join(Study, Study.id == Job.study_id)
                         .where(Job.state.in_([str(st) for st in states]))
                         .order_by(Job.updated_at.desc()).limit(limit)).all()
    return tuple(Failure(uid, j.version, j.state, j.stage, j.attempts, j.error or "", j.updated_at)
                 for j, uid in rows)


def dead_jobs(ledger: Ledger, *, limit: int = 500) -> tuple[Failure, ...]:
    """The dead-letter list: jobs that ran out of retries or failed for good, newest first."""
    return recent_failures(ledger, limit=limit, states=(JobState.DEAD,))


@dataclass(frozen=True)
class Overview:
    generated_at: datetime
    queues: QueueOverview
    studies_by_state: dict[str, int]
    throughput: tuple[Bucket, ...]
    latency: Latency
    failures: tuple[Failure, ...]
    recent: tuple[StudyRow, ...]
    spool: SpoolSpace | None = None  # free space vs spool.min_free_mb; None when the spool cannot be read

    @property
    def done_last_hour(self) -> int:
        return sum(b.done for b in self.throughput)

    @property
    def instances_last_hour(self) -> int:
        return sum(b.instances for b in self.throughput)


def overview(ledger: Ledger, settings: Settings, *, now: datetime | None = None) -> Overview:
    """Everything the dashboard's front page and ``dicom-fusion status`` show."""
    now = now or utcnow()
    return Overview(generated_at=now, queues=queue_overview(ledger, settings, now=now),
                    studies_by_state=studies_by_state(ledger), throughput=throughput(ledger, now=now),
                    latency=latency(ledger, since=now - timedelta(hours=1)),
                    failures=recent_failures(ledger), recent=list_studies(ledger, page_size=15).items,
                    spool=spool_space(settings.spool_dir, settings.spool.min_free_mb))
