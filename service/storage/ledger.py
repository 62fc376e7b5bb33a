"""The ledger: the source of truth for what was received, what runs and what was delivered.

Brokers lose messages in ways that are easy to miss (docs/architecture.md, "Durability"), so every job row carries a lease
(owner + expiry). A task may only work on a job after *claiming* it with one conditional UPDATE; the
reaper re-enqueues jobs whose lease expired. Every state change writes an audit row. Rows hold UIDs,
paths and states, never patient names, IDs or birth dates.

SQLite (WAL, synchronous=FULL) is the embedded default; any SQLAlchemy URL (PostgreSQL) works.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_fusion.service.storage.engine import WRITE, is_sqlite, ledger_engine
from dicom_fusion.service.storage.ledger_batch import CoreWriter, SqliteWriter, record_batch
from dicom_fusion.service.storage.models import (
    QUEUED_OWNER,
    STAGE_STATE,
    TERMINAL,
    AuditEvent,
    Delivery,
    DeliveryKind,
    DeliveryState,
    DriftObservation,
    Instance,
    InstanceRecord,
    Job,
    JobRef,
    JobRoute,
    JobState,
    Priority,
    RecordOutcome,
    ReleaseMode,
    Review,
    ReviewVerdict,
    RouteStudy,
    Series,
    Stage,
    Study,
    StudyState,
    utcnow,
)
from dicom_fusion.service.storage.schema import create_if_empty


class Ledger:
    """Typed operations on the ledger; each one is a short transaction.

    On an empty database the constructor creates the current tables, stamped with the head schema
    revision; it never changes a database that has tables (:mod:`.schema` says who migrates those).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = is_sqlite(url)
        self.engine: Engine = ledger_engine(url)  # SQLite: WAL, synchronous=FULL, BEGIN IMMEDIATE writers
        self._write_engine = self.engine.execution_options(**WRITE)  # same pool
        # The listener's batches go through the sqlite3 driver directly (see ledger_batch); False = Core.
        self.fast_sqlite_ingest = True
        # SQLite allows one writer; serialising writers in-process avoids busy spins between threads.
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self._ingest_raw: Any = None  # see _ingest_connection
        self._ingest_pid = 0
        create_if_empty(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(self._write_engine, expire_on_commit=False)

    def close(self) -> None:
        lock = self._write_lock
        if lock is not None:
            with lock:
                self._drop_ingest_connection()
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read session (no commit)."""
        with self._sessions() as s:
            yield s

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        lock = self._write_lock
        if lock is not None:
            lock.acquire()
        try:
            with self._write_sessions() as s, s.begin():
                yield s
        finally:
            if lock is not None:
                lock.release()

    @staticmethod
    def _audit(s: Session, entity: str, entity_id: int, event_name: str, detail: str = "") -> None:
        s.add(AuditEvent(ts=utcnow(), entity=entity, entity_id=entity_id, event=event_name,
                         detail=detail[:2000]))

    # ---- ingest -------------------------------------------------------------------------------
    @contextmanager
    def _write_connection(self) -> Iterator[Connection]:
        """A Core connection in a transaction, serialised like :meth:`transaction` (hot ingest path)."""
        lock = self._write_lock
        if lock is not None:
            lock.acquire()
        try:
            with self._write_engine.begin() as conn:
                yield conn
        finally:
            if lock is not None:
                lock.release()

    def record_instances(self, records: Sequence[InstanceRecord], *,
                         before_write: Callable[[list[int]], None] | None = None,
                         _attempts: int = 3) -> list[RecordOutcome]:
        """Record a batch of durable instances in one transaction (one commit, one WAL fsync).

        Outcomes are in the order of ``records``: ``new=False`` for a SOP Instance UID recorded
        before or earlier in the batch (the first copy is kept). ``before_write`` is called inside the
        transaction, after the duplicate check and before any row is written, with the indexes of the
        records that will be new: the listener makes their files durable there (an exception aborts
        the transaction). If another process inserts one of the UIDs concurrently (PostgreSQL; SQLite
        writers hold the lock from BEGIN IMMEDIATE), the batch is retried one record per transaction,
        so the others still land; a single record is tried again, since the conflict may be its new
        study or series (another listener's instance of the same study), not its SOP Instance UID: the
        next attempt sees the other's rows and records it, or finds it a duplicate. Any other database
        error propagates: nothing of the batch is recorded.
        This is the listener's hot path: see :mod:`.ledger_batch` for the statements.
        """
        if not records:
            return []
        try:
            if self.is_sqlite and self.fast_sqlite_ingest:
                return self._record_sqlite(records, before_write)
            with self._write_connection() as conn:
                return record_batch(CoreWriter(conn), records, utcnow(), before_write)
        except (IntegrityError, sqlite3.IntegrityError):
            if len(records) == 1:
                # Another process committed this SOP Instance UID, or this instance's new study or series,
                # between our check and insert. Not "a duplicate" yet: that answer discards the file.
                if _attempts <= 1:
                    raise
                return self.record_instances(records, before_write=before_write, _attempts=_attempts - 1)
            return [self.record_instances(
                [r], before_write=None if before_write is None else (lambda _idx, i=i: before_write([i])))[0]
                for i, r in enumerate(records)]

    def _record_sqlite(self, records: Sequence[InstanceRecord],
                       before_write: Callable[[list[int]], None] | None) -> list[RecordOutcome]:
        lock = self._write_lock
        assert lock is not None
        with lock:
            raw = self._ingest_connection()
            ok = False
            try:
                db = raw.driver_connection
                assert isinstance(db, sqlite3.Connection)
                db.execute("BEGIN IMMEDIATE")
                try:
                    outcomes = record_batch(SqliteWriter(db, self.engine.dialect), records, utcnow(), before_write)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
                ok = True
                return outcomes
            finally:
                if not ok:  # a failed batch (disk full, I/O error): the next one starts on a fresh connection
                    self._drop_ingest_connection()

    def _ingest_connection(self) -> Any:
        """The listener's batch connection, checked out of the pool once per process and kept (a pool
        checkout per batch cost ~0.1 ms, a tenth of the listener's own CPU per lone C-STORE); the connect
        hook set WAL, FULL and the busy timeout. Called under the write lock."""
        if self._ingest_raw is None or self._ingest_pid != os.getpid():  # never a connection from before a fork
            self._ingest_raw, self._ingest_pid = self.engine.raw_connection(), os.getpid()
        return self._ingest_raw

    def _drop_ingest_connection(self) -> None:
        raw, self._ingest_raw = self._ingest_raw, None
        if raw is not None and self._ingest_pid == os.getpid():
            with contextlib.suppress(Exception):
                raw.close()

    # ---- completion ---------------------------------------------------------------------------
    def complete_studies(self, *, quiet_before: datetime | None, study_uids: Sequence[str] = (),
                         route: RouteStudy | None = None, note: str = "") -> list[int]:
        """Close receiving studies (quiet since ``quiet_before``, or named) and create their jobs.

        ``route`` decides each study's jobs before it is closed (routing reads the study's headers, outside
        any transaction): one per matching route (its model and series), or the reason the study is
        ignored, recorded as one job in the terminal state ``ignored``. Each job takes its own version (the
        study's ``job_version`` grows by the number of jobs), so every job derives its own SR UIDs; the
        jobs of one completion share their ``created_at`` (docs/architecture.md "Job states"). Returns
        the ids of the jobs to run (ignored ones are not among them). The conditional UPDATE makes this
        exactly-once even with several listeners polling. ``note`` (which completion rule fired) goes into
        the study's and each job's audit row.
        """
        created: list[int] = []
        with self.session() as s:
            q = select(Study.id).where(Study.state == StudyState.RECEIVING)
            if study_uids:
                q = q.where(Study.study_uid.in_(list(study_uids)))
            elif quiet_before is not None:
                q = q.where(Study.last_received_at <= quiet_before)
            else:
                return []
            candidates = list(s.scalars(q))
        for study_id in candidates:
            plans = _job_plans(route(study_id) if route is not None else None)
            with self.transaction() as s:
                cond = [Study.id == study_id, Study.state == StudyState.RECEIVING]
                if not study_uids and quiet_before is not None:
                    cond.append(Study.last_received_at <= quiet_before)
                res = s.execute(update(Study).where(*cond).values(
                    state=StudyState.COMPLETE, job_version=Study.job_version + len(plans)))
                if res.rowcount != 1:  # type: ignore[attr-defined]
                    continue
                study = s.get(Study, study_id)
                assert study is not None
                first, now = study.job_version - len(plans) + 1, utcnow()
                for i, plan in enumerate(plans):
                    job = self._new_job(s, study, plan, "complete", note, version=first + i, now=now)
                    if job.state != JobState.IGNORED:
                        created.append(job.id)
        return created

    def _new_job(self, s: Session, study: Study, decision: JobRoute | str | None, event_name: str,
                 note: str = "", *, version: int | None = None, now: datetime | None = None) -> Job:
        """A job row (version ``version``, default the study's current one): routed (``JobRoute``), ignored
        (a reason) or, with no routing (``None``), on the default model over every series. The jobs of one
        completion or replay are created with one ``now``: their shared ``created_at`` groups them."""
        now = now or utcnow()
        job = Job(study_id=study.id, version=study.job_version if version is None else version,
                  state=JobState.COMPLETE, stage=Stage.PREPARE,
                  attempts=0, instance_count=study.instance_count, created_at=now, updated_at=now,
                  lease_owner=None, lease_expires=None)
        if isinstance(decision, JobRoute):
            job.route, job.card_path, job.model = decision.route, decision.card_path, decision.model
            job.series_uids = json.dumps(list(decision.series_uids))
            job.release = decision.release
            job.priority = decision.priority
        elif isinstance(decision, str):
            job.state, job.error, job.finished_at = JobState.IGNORED, decision[:2000], now
        s.add(job)
        s.flush()
        self._audit(s, "study", study.id, event_name, f"job={job.id} version={job.version} {note}".rstrip())
        if job.state == JobState.IGNORED:
            self._audit(s, "job", job.id, JobState.IGNORED, job.error or "")
        else:
            routed = f" route={job.route} model={job.model}" if job.route else ""
            if job.priority and job.priority != Priority.NORMAL:
                routed += f" priority={job.priority}"
            self._audit(s, "job", job.id, JobState.COMPLETE,
                        f"instances={study.instance_count}{routed} {note}".rstrip())
        return job

    # ---- job leases ---------------------------------------------------------------------------
    def mark_enqueued(self, job_id: int, *, stage: Stage, lease_seconds: float,
                      requeue: bool = False, expired_only: bool = False) -> Priority | None:
        """Record that a message for ``stage`` is in the broker; the lease bounds how long we trust it.
        Returns the job's priority (which queues the message goes to).

        ``expired_only`` (the reaper): mark it only while the job still waits at ``stage`` with its lease
        run out (or was never enqueued); otherwise None, and the caller must not publish. The reaper's
        list of expired jobs is stale by the time it re-enqueues each: another `serve` process's reaper
        may have re-enqueued the job and a worker claimed it since. Re-marking it then would take the
        lease from that worker, and the second message would let another worker run the same stage at
        the same time (two deliveries). The row is locked (SELECT … FOR UPDATE on PostgreSQL; SQLite
        writers are serialised), so of two reapers exactly one re-enqueues an expiry."""
        with self.transaction() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if expired_only and (job is None or job.stage != stage or not self._awaits_requeue(s, job_id)):
                return None
            if job is None or job.state in TERMINAL:
                return Priority.NORMAL if job is None else Priority(job.priority or Priority.NORMAL)
            if job.state == JobState.COMPLETE:
                job.state = JobState.QUEUED
            job.lease_owner = QUEUED_OWNER
            job.lease_expires = utcnow() + timedelta(seconds=lease_seconds)
            job.updated_at = utcnow()
            self._audit(s, "job", job_id, "requeued" if requeue else "queued", f"stage={stage}")
            return Priority(job.priority or Priority.NORMAL)

    @staticmethod
    def _awaits_requeue(s: Session, job_id: int) -> bool:
        """The reaper's condition (:meth:`expired_jobs`), evaluated in SQL on the locked row (timestamps
        compare in the database, as in :meth:`claim`)."""
        return s.scalar(select(Job.id).where(Job.id == job_id, *_requeue_due(utcnow()))) is not None

    def claim(self, job_id: int, *, stage: Stage, owner: str, lease_seconds: float) -> JobRef | None:
        """Take the job for ``stage``; None when another worker holds it or the stage is past."""
        now = utcnow()
        with self.transaction() as s:
            res = s.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.stage == stage,
                    Job.state.not_in([str(t) for t in TERMINAL]),
                    or_(Job.lease_owner.is_(None), Job.lease_owner == QUEUED_OWNER,
                        Job.lease_expires < now),
                )
                .values(lease_owner=owner, lease_expires=now + timedelta(seconds=lease_seconds),
                        state=STAGE_STATE[stage], updated_at=now)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return None
            job = s.get(Job, job_id)
            assert job is not None
            study = s.get(Study, job.study_id)
            assert study is not None
            self._audit(s, "job", job_id, STAGE_STATE[stage], f"stage={stage} owner={owner}")
            return JobRef(job_id=job.id, study_id=job.study_id, study_uid=study.study_uid,
                          version=job.version, stage=Stage(job.stage), attempts=job.attempts,
                          created_at=job.created_at, card_path=job.card_path,
                          series_uids=tuple(json.loads(job.series_uids)) if job.series_uids else (),
                          release=ReleaseMode(job.release or ReleaseMode.AUTO), review=_review_of(job),
                          priority=Priority(job.priority or Priority.NORMAL))

    def renew(self, job_id: int, *, owner: str, lease_seconds: float) -> bool:
        with self.transaction() as s:
            res = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner).values(
                lease_expires=utcnow() + timedelta(seconds=lease_seconds)))
            return res.rowcount == 1  # type: ignore[attr-defined]

    def advance(self, job_id: int, *, owner: str, next_stage: Stage, lease_seconds: float) -> bool:
        """Finish the current stage and hand the job to ``next_stage`` (message about to be sent)."""
        with self.transaction() as s:
            job = s.get(Job, job_id, with_for_update=True)  # checked, then changed: lock the row
            if job is None or job.lease_owner != owner:
                return False
            now = utcnow()
            job.stage = next_stage
            job.state = STAGE_STATE[next_stage]
            job.lease_owner = QUEUED_OWNER
            job.lease_expires = now + timedelta(seconds=lease_seconds)
            job.attempts = 0
            job.error = None
            job.updated_at = now
            self._audit(s, "job", job_id, "stage_done", f"next={next_stage}")
            return True

    def finish(self, job_id: int, *, owner: str) -> JobState | None:
        """The last stage is done: `done`, or `rejected` after a reviewer's rejection. None: not our lease."""
        with self.transaction() as s:
            job = s.get(Job, job_id, with_for_update=True)  # checked, then changed: lock the row
            if job is None or job.lease_owner != owner:
                return None
            now = utcnow()
            job.state = JobState.REJECTED if job.review == ReviewVerdict.REJECTED else JobState.DONE
            job.stage = Stage.FINISHED
            job.lease_owner = None
            job.lease_expires = None
            job.error = None
            job.updated_at = now
            job.finished_at = now
            self._audit(s, "job", job_id, job.state)
            return JobState(job.state)

    def fail(self, job_id: int, *, owner: str, reason: str, retry_in: float | None,
             lease_seconds: float) -> JobState:
        """Record a failure: retrying (``retry_in`` seconds) or dead. Returns the new state."""
        with self.transaction() as s:
            job = s.get(Job, job_id, with_for_update=True)  # checked, then changed: lock the row
            if job is None:
                return JobState.DEAD
            if job.lease_owner not in (owner, QUEUED_OWNER) and job.state in TERMINAL:
                return JobState(job.state)
            now = utcnow()
            job.attempts += 1
            job.error = reason[:2000]
            job.updated_at = now
            if retry_in is None:
                job.state = JobState.DEAD
                job.lease_owner = None
                job.lease_expires = None
                job.finished_at = now
            else:
                job.state = JobState.FAILED
                job.lease_owner = QUEUED_OWNER
                job.lease_expires = now + timedelta(seconds=retry_in + lease_seconds)
            self._audit(s, "job", job_id, job.state, reason)
            return JobState(job.state)

    def expired_jobs(self) -> list[tuple[int, Stage]]:
        """Jobs whose lease ran out (worker killed, message lost) or never got enqueued."""
        with self.session() as s:
            rows = s.execute(select(Job.id, Job.stage, Job.state).where(*_requeue_due(utcnow()))).all()
        return [(r[0], Stage(r[1])) for r in rows]

    def release_leases(self, owner_prefix: str) -> list[int]:
        """Expire now the leases of every unfinished job whose owner starts with ``owner_prefix``
        (``"host:pid:"`` of a worker process known to be dead), so the reaper re-enqueues those jobs at
        once instead of when their lease runs out (docs/architecture.md, "Durability contract").
        The owner is kept (the audit names it); a claim takes an expired lease. Returns the job ids."""
        if owner_prefix.count(":") != 2 or not owner_prefix.endswith(":"):
            raise ValueError(f"owner prefix must be 'host:pid:', got {owner_prefix!r}")
        now = utcnow()
        held = (Job.lease_owner.startswith(owner_prefix, autoescape=True),
                Job.state.not_in([str(t) for t in TERMINAL]), Job.lease_expires >= now)
        with self.transaction() as s:
            ids = list(s.execute(select(Job.id).where(*held)).scalars())
            if ids:
                s.execute(update(Job).where(Job.id.in_(ids), *held).values(lease_expires=now - timedelta(seconds=1)))
            for job_id in ids:
                self._audit(s, "job", job_id, "lease_released", f"owner {owner_prefix} is gone")
        return ids

    def lease_owner_prefixes(self, host: str) -> set[str]:
        """The ``"host:pid:"`` of every live lease held on ``host`` (a starting worker checks each pid)."""
        with self.session() as s:
            owners = s.execute(select(Job.lease_owner).distinct().where(
                Job.lease_owner.startswith(f"{host}:", autoescape=True),
                Job.state.not_in([str(t) for t in TERMINAL]), Job.lease_expires >= utcnow())).scalars()
            return {":".join(o.split(":")[:2]) + ":" for o in owners if o and o.count(":") >= 2}

    def reset_for_redelivery(self, job_id: int) -> bool:
        """Operator action: a dead job goes back to its stage with a fresh retry budget."""
        with self.transaction() as s:
            job = s.get(Job, job_id, with_for_update=True)  # checked, then changed: lock the row
            if job is None or job.state != JobState.DEAD:
                return False
            job.state = JobState.QUEUED
            job.attempts = 0
            job.lease_owner = None
            job.lease_expires = None
            job.finished_at = None
            for d in s.scalars(select(Delivery).where(Delivery.job_id == job_id)):
                if d.state in (DeliveryState.DEAD, DeliveryState.FAILED):
                    d.state = DeliveryState.PENDING
            self._audit(s, "job", job_id, "redeliver", "operator")
            return True

    def add_job_version(self, study_uid: str, *, reason: str, route: RouteStudy | None = None) -> list[int] | None:
        """Operator replay: new job versions over the instances stored so far, routed again: one per
        matching route (as at completion), or one ignored job.

        None when the study is unknown, still receiving, or has a job that is not finished yet; the new
        jobs' ids otherwise, in version order (an ignored one included: its state says so).
        """
        with self.session() as s:
            study_id = s.scalar(select(Study.id).where(Study.study_uid == study_uid))
        if study_id is None:
            return None
        plans = _job_plans(route(study_id) if route is not None else None)
        with self.transaction() as s:
            study = s.get(Study, study_id)
            if study is None or study.state != StudyState.COMPLETE:
                return None
            if s.scalar(select(Job.id).where(Job.study_id == study.id,
                                             Job.state.not_in([str(t) for t in TERMINAL]))) is not None:
                return None
            now, ids = utcnow(), []
            for plan in plans:
                study.job_version += 1
                ids.append(self._new_job(s, study, plan, "replay", reason, now=now).id)
            return ids

    def record_action(self, job_id: int, action: str, *, actor: str) -> None:
        """An audit row naming who asked for an operator action on the job (retry, replay, redeliver): the
        signed-in user, the API token's user, `service` (api.token) or `console` (the CLI)."""
        with self.transaction() as s:
            self._audit(s, "job", job_id, f"operator_{action}", f"by={actor[:128]}")

    # ---- review before release (docs/architecture.md "Job states") --------------------------------
    def await_review(self, job_id: int, *, owner: str) -> bool:
        """The stage holding the job ends and the job parks in `awaiting_review`: no lease (the reaper leaves
        it alone), nothing enqueued, until :meth:`decide_review`."""
        with self.transaction() as s:
            job = s.get(Job, job_id, with_for_update=True)  # checked, then changed: lock the row
            if job is None or job.lease_owner != owner:
                return False
            now = utcnow()
            job.state, job.stage = JobState.AWAITING_REVIEW, Stage.REVIEW
            job.lease_owner = job.lease_expires = None
            job.attempts, job.error = 0, None
            job.awaiting_since = job.updated_at = now
            self._audit(s, "job", job_id, JobState.AWAITING_REVIEW)
            return True

    def decide_review(self, job_id: int, review: Review, *, lease_seconds: float) -> ReviewOutcome:
        """Record a reviewer's decision, exactly once: one conditional UPDATE on a job still awaiting review
        without a decision, so two browsers approving at once (or approving twice) give one result.

        The job then goes back to its deliver stage, queued (the caller publishes the message): an approval
        sends the verified SR and the final report; a rejection retracts the preliminary report, if one was
        sent. A rejection with nothing to retract ends the job `rejected` here.
        """
        now = utcnow()
        with self.transaction() as s:
            retract = s.scalar(select(Delivery.id).where(
                Delivery.job_id == job_id, Delivery.kind == DeliveryKind.PRELIMINARY,
                Delivery.state != DeliveryState.SKIPPED)) is not None
            values: dict[str, Any] = dict(
                review=review.verdict, reviewer=review.reviewer[:128], review_comment=review.comment[:4000],
                reviewer_organization=review.organization[:128] or None,
                reviewed_finding=review.finding_code, reviewed_at=review.at, updated_at=now)
            if review.verdict == ReviewVerdict.APPROVED or retract:
                values.update(state=JobState.QUEUED, stage=Stage.DELIVER, lease_owner=QUEUED_OWNER,
                              lease_expires=now + timedelta(seconds=lease_seconds), attempts=0, error=None)
            else:
                values.update(state=JobState.REJECTED, stage=Stage.FINISHED, lease_owner=None,
                              lease_expires=None, finished_at=now)
            res = s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.AWAITING_REVIEW,
                                              Job.review.is_(None)).values(**values))
            if res.rowcount != 1:  # type: ignore[attr-defined]
                job = s.get(Job, job_id)
                return ReviewOutcome(False, None if job is None else JobState(job.state), False,
                                     None if job is None else job.review)
            changed = f" finding={review.finding_code}" if review.finding_code else ""
            # The audit row names the reviewer (the accountable person), never the comment (free text).
            self._audit(s, "job", job_id, f"review_{review.verdict}", f"by={review.reviewer[:128]}{changed}")
            return ReviewOutcome(True, JobState(values["state"]), values["state"] == JobState.QUEUED, None)

    def awaiting_review(self) -> list[Job]:
        """Jobs waiting for a reviewer, oldest first."""
        with self.session() as s:
            return list(s.scalars(select(Job).where(Job.state == JobState.AWAITING_REVIEW)
                                  .order_by(Job.awaiting_since, Job.id)))

    # ---- results and deliveries ---------------------------------------------------------------
    def set_result(self, job_id: int, *, finding: str, probability: float, image_only: bool,
                   sr_uid: str) -> None:
        with self.transaction() as s:
            job = s.get(Job, job_id)
            if job is not None:
                job.finding, job.probability, job.image_only, job.sr_uid = finding, probability, image_only, sr_uid

    def record_drift(self, job_id: int, *, model_name: str, model_version: str,
                     items: dict[str, float]) -> bool:
        """Store the drift items of a job's study for its model (README "Drift"); False when the job already
        has them (a redelivered infer stage, or two workers racing on PostgreSQL): the first one stays."""
        try:
            with self.transaction() as s:
                if s.scalar(select(DriftObservation.id).where(DriftObservation.job_id == job_id,
                                                              DriftObservation.model_name == model_name)):
                    return False
                s.add(DriftObservation(job_id=job_id, model_name=model_name, model_version=model_version,
                                       created_at=utcnow(), items=json.dumps(items, sort_keys=True)))
        except IntegrityError:
            return False
        return True

    def ensure_deliveries(self, job_id: int, *, targets: dict[DeliveryKind, str | None]) -> None:
        """Create the delivery pair; a target of None means the side is not owed (skipped)."""
        with self.transaction() as s:
            existing = {d.kind for d in s.scalars(select(Delivery).where(Delivery.job_id == job_id))}
            for kind, target in targets.items():
                if kind in existing:
                    continue
                state = DeliveryState.PENDING if target else DeliveryState.SKIPPED
                d = Delivery(job_id=job_id, kind=kind, state=state, attempts=0, target=target or "")
                s.add(d)
                s.flush()
                self._audit(s, "delivery", d.id, state, f"kind={kind}")

    def pending_deliveries(self, job_id: int) -> list[DeliveryKind]:
        with self.session() as s:
            rows = s.scalars(select(Delivery.kind).where(
                Delivery.job_id == job_id,
                Delivery.state.in_([DeliveryState.PENDING, DeliveryState.FAILED])))
            return [DeliveryKind(k) for k in rows]

    def delivery_result(self, job_id: int, kind: DeliveryKind, *, ok: bool, remote_id: str | None = None,
                        error: str | None = None, dead: bool = False) -> None:
        with self.transaction() as s:
            d = s.scalar(select(Delivery).where(Delivery.job_id == job_id, Delivery.kind == kind))
            if d is None:
                return
            d.attempts += 1
            if ok:
                d.state = DeliveryState.DELIVERED
                d.remote_id = remote_id
                d.delivered_at = utcnow()
                d.last_error = None
            else:
                d.state = DeliveryState.DEAD if dead else DeliveryState.FAILED
                d.last_error = (error or "")[:2000]
            self._audit(s, "delivery", d.id, d.state, f"kind={kind} {error or remote_id or ''}")

    def bury_deliveries(self, job_id: int, *, reason: str) -> int:
        """The job died: every side not yet delivered becomes `dead`, keeping its own last error
        (the attempt count is not touched: burying is not an attempt). Returns how many."""
        n = 0
        with self.transaction() as s:
            for d in s.scalars(select(Delivery).where(
                    Delivery.job_id == job_id,
                    Delivery.state.in_([DeliveryState.PENDING, DeliveryState.FAILED]))):
                d.state = DeliveryState.DEAD
                d.last_error = d.last_error or reason[:2000]
                self._audit(s, "delivery", d.id, DeliveryState.DEAD, f"kind={d.kind} job dead: {reason[:200]}")
                n += 1
        return n

    # ---- queries ------------------------------------------------------------------------------
    def study_files(self, study_id: int, series_uids: Sequence[str] = ()) -> list[Path]:
        """The study's spooled files in arrival order; only those of `series_uids` when given (the series
        the job's route selected)."""
        q = select(Instance.path).where(Instance.study_id == study_id).order_by(Instance.id)
        if series_uids:
            q = q.join(Series, Series.id == Instance.series_id).where(Series.series_uid.in_(list(series_uids)))
        with self.session() as s:
            return [Path(p) for p in s.scalars(q)]

    def job(self, job_id: int) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def jobs_for_study(self, study_uid: str) -> list[Job]:
        with self.session() as s:
            return list(s.scalars(select(Job).join(Study, Study.id == Job.study_id)
                                  .where(Study.study_uid == study_uid).order_by(Job.version)))

    def current_jobs(self, study_uid: str) -> list[Job]:
        """The jobs of the study's latest completion or replay (one per route that took it, or one ignored
        job), in version order: those created with its newest job (same ``created_at``)."""
        jobs = self.jobs_for_study(study_uid)
        return [j for j in jobs if j.created_at == jobs[-1].created_at] if jobs else []

    def deliveries(self, job_id: int) -> list[Delivery]:
        with self.session() as s:
            return list(s.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.kind)))

    def audit_events(self, entity: str, entity_id: int) -> list[AuditEvent]:
        with self.session() as s:
            return list(s.scalars(select(AuditEvent).where(
                AuditEvent.entity == entity, AuditEvent.entity_id == entity_id).order_by(AuditEvent.id)))


def _requeue_due(now: datetime) -> tuple[Any, ...]:
    """Where-clauses of a job the reaper must enqueue again: unfinished, and its lease ran out (worker
    killed, message lost) or it was never enqueued (created over 5 s ago, still `complete`)."""
    return (Job.state.not_in([str(t) for t in TERMINAL]),
            or_(Job.lease_expires < now,
                (Job.state == JobState.COMPLETE) & (Job.created_at < now - timedelta(seconds=5))))


def _job_plans(decision: Sequence[JobRoute] | JobRoute | str | None) -> list[JobRoute | str | None]:
    """A routing decision as the list of jobs to create: one per route, or one ignored (a reason) or
    unrouted (None) job. An empty sequence of routes is a routing bug, never "no job"."""
    if decision is None or isinstance(decision, (str, JobRoute)):
        return [decision]
    plans: list[JobRoute | str | None] = list(decision)
    if not plans:
        raise ValueError("routing returned no job and no reason to ignore the study")
    return plans


def _review_of(job: Job) -> Review | None:
    if not job.review:
        return None
    return Review(verdict=ReviewVerdict(job.review), reviewer=job.reviewer or "", comment=job.review_comment or "",
                  finding_code=job.reviewed_finding, at=job.reviewed_at or job.updated_at,
                  organization=job.reviewer_organization or "")


@dataclass(frozen=True)
class ReviewOutcome:
    """What :meth:`Ledger.decide_review` did: `recorded` once per job; `enqueue` when the deliver stage must
    run (the caller publishes it); else the job's state and any earlier verdict, for the refusal message."""

    recorded: bool
    state: JobState | None
    enqueue: bool
    earlier: str | None
