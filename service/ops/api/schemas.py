"""Response schemas of the REST API (separate from the ledger's storage models).

They carry UIDs, counts, states, timestamps (UTC) and failure reasons only: no patient name, ID or
birth date is ever part of a response.
"""
from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)


class HealthOut(_Out):
    status: str


class CheckOut(_Out):
    name: str
    ok: bool
    detail: str
    seconds: float


class ReadyOut(_Out):
    ready: bool
    checks: list[CheckOut]


class QueueOut(_Out):
    name: str
    depth: int | None
    waiting: int
    in_flight: int
    oldest_waiting_seconds: float | None


class QueuesOut(_Out):
    broker: str
    broker_error: str | None
    queues: list[QueueOut]
    workers: list[str] | None


class StudySummaryOut(_Out):
    study_uid: str
    state: str
    instances: int
    first_received_at: datetime
    last_received_at: datetime
    job_version: int
    stage: str | None
    finding: str | None
    probability: float | None
    error: str | None


class StudyPageOut(_Out):
    items: list[StudySummaryOut]
    total: int
    page: int
    page_size: int


class SeriesOut(_Out):
    series_uid: str
    modality: str
    instances: int


class DeliveryOut(_Out):
    kind: str
    state: str
    attempts: int
    target: str
    remote_id: str | None
    last_error: str | None
    delivered_at: datetime | None


class AuditOut(_Out):
    ts: datetime
    event: str
    detail: str


class JobOut(_Out):
    version: int
    state: str
    stage: str
    attempts: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    latency_seconds: float | None
    stage_seconds: dict[str, float]
    finding: str | None
    probability: float | None
    image_only: bool | None
    sr_uid: str | None
    report_id: str | None
    report_url: str | None = None
    deliveries: list[DeliveryOut]
    history: list[AuditOut]


class StudyDetailOut(_Out):
    study_uid: str
    state: str
    instances: int
    bytes: int
    first_received_at: datetime
    last_received_at: datetime
    calling_ae: str
    series: list[SeriesOut]
    jobs: list[JobOut]
    errors: list[str]


class ActionOut(_Out):
    action: str
    study_uid: str
    job_version: int
    stage: str
    message: str


class RedeliverOut(_Out):
    redelivered: list[ActionOut]


class FailureOut(_Out):
    study_uid: str
    version: int
    state: str
    stage: str
    attempts: int
    error: str
    updated_at: datetime


class LatencyOut(_Out):
    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None


class BucketOut(_Out):
    start: datetime
    instances: int
    done: int
    dead: int


class OverviewOut(_Out):
    generated_at: datetime
    queues: QueuesOut
    studies_by_state: dict[str, int]
    throughput: list[BucketOut]
    latency: LatencyOut
    failures: list[FailureOut]
    done_last_hour: int
    instances_last_hour: int
