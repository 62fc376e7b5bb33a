"""The ledger's tables, state enums and the small records that cross its API.

The table models (SQLAlchemy declarative) are the schema Alembic migrates
(:mod:`dicom_fusion.service.storage.migrations`); the enums are the job state machine of
docs/architecture.md ("Job states"). Rows hold UIDs, paths and states, never patient names, IDs or
birth dates.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

QUEUED_OWNER = "queued"


def utcnow() -> datetime:
    """Naive UTC, so comparisons behave the same on SQLite and PostgreSQL."""
    return datetime.now(UTC).replace(tzinfo=None)


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"  # instances arriving; completion waits for the quiet period
    COMPLETE = "complete"  # a job version was created for the instances received so far


class JobState(enum.StrEnum):
    COMPLETE = "complete"
    QUEUED = "queued"
    PREPARING = "preparing"
    INFERRING = "inferring"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"  # retrying
    DEAD = "dead"
    IGNORED = "ignored"  # no route matched / nothing a model reads / our own output: terminal, with a reason
    AWAITING_REVIEW = "awaiting_review"  # release mode review: inferred, nothing sent until a reviewer acts
    REJECTED = "rejected"  # a reviewer rejected the result: terminal, nothing went to the PACS


class Stage(enum.StrEnum):
    PREPARE = "prepare"
    TIMELINE = "timeline"
    INFER = "infer"
    DELIVER = "deliver"
    REVIEW = "review"  # parked until approve / reject (no task runs it)
    FINISHED = "finished"


STAGE_STATE = {
    Stage.PREPARE: JobState.PREPARING,
    Stage.TIMELINE: JobState.PREPARING,
    Stage.INFER: JobState.INFERRING,
    Stage.DELIVER: JobState.DELIVERING,
}
TERMINAL = (JobState.DONE, JobState.DEAD, JobState.IGNORED, JobState.REJECTED)


class ReleaseMode(enum.StrEnum):
    AUTO = "auto"  # results leave at once (report status `release.auto_status`, SR unverified)
    REVIEW = "review"  # results wait in `awaiting_review` for a reviewer's approval


class Priority(enum.StrEnum):
    """A job's priority (README "Routing", "Priority"): urgent jobs overtake queued normal ones at every
    stage, background jobs run when nothing else waits. Fixed when the job is created."""

    URGENT = "urgent"
    NORMAL = "normal"
    BACKGROUND = "background"


class ReviewVerdict(enum.StrEnum):
    APPROVED = "approved"
    REJECTED = "rejected"


class DeliveryKind(enum.StrEnum):
    SR = "sr"
    REPORT = "report"
    HL7 = "hl7"  # optional HL7 v2 ORU^R01 over MLLP (skipped unless hl7.enabled)
    PRELIMINARY = "preliminary"  # review mode: the preliminary DiagnosticReport sent before review
    PRELIMINARY_SR = "preliminary_sr"  # review mode: the UNVERIFIED SR sent before review (send_preliminary_sr)


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # retrying
    DEAD = "dead"
    SKIPPED = "skipped"  # not owed (e.g. FHIR not configured)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    job_version: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(DateTime)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("study_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str] = mapped_column(String(16), default=Stage.PREPARE)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    finding: Mapped[str | None] = mapped_column(String(128), nullable=True)
    probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    image_only: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    sr_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    route: Mapped[str] = mapped_column(String(64), default="")  # the route that matched ("" = ignored)
    card_path: Mapped[str] = mapped_column(Text, default="")  # the model card the worker loads for this job
    model: Mapped[str] = mapped_column(String(128), default="")  # "name version" of that card, for display
    series_uids: Mapped[str] = mapped_column(Text, default="")  # JSON list: the series the model reads
    release: Mapped[str] = mapped_column(String(16), default=ReleaseMode.AUTO)  # fixed when the job is created
    priority: Mapped[str] = mapped_column(String(16), default=Priority.NORMAL)  # fixed when the job is created
    awaiting_since: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # entered awaiting_review
    review: Mapped[str | None] = mapped_column(String(16), nullable=True)  # ReviewVerdict once a reviewer acted
    reviewer: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the reviewer's display name
    reviewer_organization: Mapped[str | None] = mapped_column(String(128), nullable=True)
    review_comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    reviewed_finding: Mapped[str | None] = mapped_column(String(128), nullable=True)  # class code, if changed
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("job_id", "kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    target: Mapped[str] = mapped_column(String(256), default="")
    remote_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class AuditEvent(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[datetime] = mapped_column(DateTime, index=True)
    entity: Mapped[str] = mapped_column(String(16))
    entity_id: Mapped[int] = mapped_column(Integer, index=True)
    event: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")


class DriftObservation(Base):
    """The drift items of one job's study for one model (inference/serve/drift_items.py), which ops/drift.py
    compares with the model card's reference. `items` is a JSON object of item name -> number (intensity
    statistics, timeline coverage and scaled values, the calibrated probability): values only, nothing that
    names a patient. One row per job and model: a redelivered infer stage does not record twice."""

    __tablename__ = "drift_observations"
    __table_args__ = (UniqueConstraint("job_id", "model_name"),
                      Index("ix_drift_observations_model", "model_name", "model_version", "created_at"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    items: Mapped[str] = mapped_column(Text)


class Role(enum.StrEnum):
    """What a named user of the API and dashboard may do (README "Users and roles")."""

    VIEWER = "viewer"  # read: queues, studies, metrics
    REVIEWER = "reviewer"  # read + approve / reject results awaiting review
    OPERATOR = "operator"  # read + retry, replay, redeliver (the service token `api.token` is one)
    ADMIN = "admin"  # read + operate + manage users
    SENDER = "sender"  # store instances over STOW-RS, nothing else (a cloud archive, a viewer that pushes)


class User(Base):
    """A named person who signs in; the password is an argon2id hash, never the password."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(128))  # what verified SRs and final reports name
    organization: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(Text)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)  # consecutive; reset by a good password
    last_failed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class ApiToken(Base):
    """A user's API token: only its SHA-256 is stored (the token is random, so a slow hash adds nothing);
    shown once when created, revocable."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class WebSession(Base):
    """A dashboard sign-in: the cookie holds a random id, the ledger only its SHA-256; the CSRF token every
    state-changing request of that session must echo; ends at sign-out, expiry or when the user is disabled."""

    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


@dataclass(frozen=True)
class JobRef:
    """What a task needs to run a job: ids and paths only."""

    job_id: int
    study_id: int
    study_uid: str
    version: int
    stage: Stage
    attempts: int
    created_at: datetime
    card_path: str = ""  # the job's model card ("" = the configured default model)
    series_uids: tuple[str, ...] = ()  # the series its route selected (() = every stored series)
    release: ReleaseMode = ReleaseMode.AUTO
    review: Review | None = None  # the reviewer's decision, once there is one
    priority: Priority = Priority.NORMAL  # which queues its stages go to (jobs/queues.py)


@dataclass(frozen=True)
class Review:
    """A reviewer's decision on a job's result, as recorded in the ledger. It holds the reviewer's name
    (written into the verified SR and the final report) and free-text comment: clinical outputs and the
    authenticated review pages show them, logs never do."""

    verdict: ReviewVerdict
    reviewer: str
    comment: str
    finding_code: str | None  # the class the reviewer chose when it differs from the model's; None = kept
    at: datetime
    organization: str = ""  # the reviewer's organisation (user record); "" = `release.organization`


@dataclass(frozen=True)
class JobRoute:
    """Where a new job goes: the route that matched, its model card and the series the model reads."""

    route: str
    card_path: str
    model: str  # "name version", for display
    series_uids: tuple[str, ...]
    release: ReleaseMode = ReleaseMode.AUTO
    priority: Priority = Priority.NORMAL


#: Decides a completing study's jobs: study id -> one route per job to create (several when matching routes
#: say `continue`), or the reason the study is ignored.
RouteStudy = Callable[[int], "Sequence[JobRoute] | JobRoute | str"]


@dataclass(frozen=True)
class FilingHeader:
    """The six values an instance is filed under, read from its header by the listener (the hot path
    decodes nothing else) and stored on its ledger rows."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    transfer_syntax: str


@dataclass(frozen=True)
class InstanceRecord(FilingHeader):
    """One durable instance to record: its filing header and where the spool holds its bytes."""

    path: Path
    sha256: str
    size: int
    calling_ae: str

    @classmethod
    def of(cls, header: FilingHeader, *, path: Path, sha256: str, size: int, calling_ae: str) -> InstanceRecord:
        """The record of an instance filed under ``header`` (any object with the six fields)."""
        filing = {f: getattr(header, f) for f in FilingHeader.__dataclass_fields__}
        return cls(**filing, path=path, sha256=sha256, size=size, calling_ae=calling_ae)


@dataclass(frozen=True)
class RecordOutcome:
    new: bool  # False: duplicate SOP Instance UID, already acknowledged earlier
    study_uid: str
