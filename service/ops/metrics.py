"""Ledger-derived Prometheus metrics, served by the API's ``/metrics``.

Counts, states, queue depths and end-to-end latency, computed from the ledger (and the broker) at
scrape time: the same whichever process asks, and they survive restarts. What only one listener or
worker process sees (DICOM responses, task durations, inference time, GPU memory) is in
:mod:`dicom_fusion.service.telemetry`, served by that process.

Label values are stage, queue, state, status, model names and versions and drift item names only — never
a patient identifier (and not even a UID: those would make unbounded series).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, extract, func, select

from dicom_fusion.service.config import Settings
from dicom_fusion.service.ops.drift import model_drift
from dicom_fusion.service.ops.monitoring import queue_overview
from dicom_fusion.service.ops.review import worklist
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import (
    Delivery,
    DeliveryKind,
    DeliveryState,
    Instance,
    Job,
    JobState,
    ReleaseMode,
    Study,
)
from dicom_fusion.service.telemetry import PREFIX

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
def _seconds_between(ledger: Ledger, start: Any, end: Any) -> Any:
    if ledger.engine.dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return extract("epoch", end - start)  # PostgreSQL: EXTRACT(epoch FROM interval)


class LedgerCollector(Collector):
    """Metrics computed from the ledger at scrape time (see the module docstring)."""

    def __init__(self, ledger: Ledger, settings: Settings) -> None:
        self.ledger = ledger
        self.settings = settings

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily: registering must not query the database

    def collect(self) -> Iterator[Metric]:
        yield from self._ingest()
        yield from self._jobs()
        yield from self._queues()
        yield from self._latency()
        yield from self._deliveries()
        yield from self._drift()

    def _ingest(self) -> Iterator[Metric]:
        with self.ledger.session() as s:
            n, size = s.execute(select(func.count(Instance.id), func.coalesce(func.sum(Instance.size), 0))).one()
            studies = s.scalar(select(func.count(Study.id))) or 0
        quarantine = self.settings.spool_dir / "quarantine"
        quarantined = sum(1 for _ in quarantine.glob("*.json")) if quarantine.is_dir() else 0
        received = CounterMetricFamily(f"{PREFIX}_instances_received", "Instances received, by result",
                                       labels=["result"])
        received.add_metric(["stored"], float(n))
        received.add_metric(["quarantined"], float(quarantined))
        yield received
        yield CounterMetricFamily(f"{PREFIX}_instance_bytes", "Bytes of stored instances", value=float(size))
        yield CounterMetricFamily(f"{PREFIX}_studies_received", "Distinct studies received", value=float(studies))

    def _jobs(self) -> Iterator[Metric]:
        with self.ledger.session() as s:
            by_state = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        yield CounterMetricFamily(f"{PREFIX}_jobs_created", "Job versions created (study completions and replays)",
                                  value=float(sum(by_state.values())))
        yield CounterMetricFamily(f"{PREFIX}_studies_completed", "Jobs finished with SR and report delivered",
                                  value=float(by_state.get(JobState.DONE, 0)))
        g = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs by current state", labels=["state"])
        for st in JobState:
            g.add_metric([st.value], float(by_state.get(st.value, 0)))
        yield g
        yield from self._review()

    def _review(self) -> Iterator[Metric]:
        """Results waiting for a clinician (README "Review"); the alert fires past release.review_timeout_hours."""
        items = worklist(self.ledger, self.settings)
        yield GaugeMetricFamily(f"{PREFIX}_awaiting_review_oldest_seconds",
                                "Age of the oldest result awaiting review (0 when none waits)",
                                value=max((i.awaiting_seconds for i in items), default=0.0))
        yield GaugeMetricFamily(f"{PREFIX}_awaiting_review_overdue",
                                "Results awaiting review for longer than release.review_timeout_hours",
                                value=float(sum(i.overdue for i in items)))
        yield GaugeMetricFamily(f"{PREFIX}_review_timeout_seconds", "release.review_timeout_hours in seconds",
                                value=self.settings.release.review_timeout_hours * 3600.0)

    def _queues(self) -> Iterator[Metric]:
        ov = queue_overview(self.ledger, self.settings)
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Messages waiting in the broker", labels=["queue"])
        waiting = GaugeMetricFamily(f"{PREFIX}_jobs_waiting", "Jobs queued and not yet claimed (ledger)",
                                    labels=["queue"])
        flight = GaugeMetricFamily(f"{PREFIX}_jobs_in_flight", "Jobs a worker holds a lease on", labels=["queue"])
        oldest = GaugeMetricFamily(f"{PREFIX}_queue_oldest_waiting_seconds", "Age of the oldest waiting job",
                                   labels=["queue"])
        for q in ov.queues:
            if q.depth is not None:
                depth.add_metric([q.name], float(q.depth))
            waiting.add_metric([q.name], float(q.waiting))
            flight.add_metric([q.name], float(q.in_flight))
            oldest.add_metric([q.name], float(q.oldest_waiting_seconds or 0.0))
        yield from (depth, waiting, flight, oldest)
        yield GaugeMetricFamily(f"{PREFIX}_broker_up", "1 when the broker could be read",
                                value=0.0 if ov.broker_error else 1.0)

    def _latency(self) -> Iterator[Metric]:
        dur = _seconds_between(self.ledger, Job.created_at, Job.finished_at)
        cols = [func.count(Job.id), func.coalesce(func.sum(dur), 0.0)]
        cols += [func.coalesce(func.sum(case((dur <= b, 1), else_=0)), 0) for b in LATENCY_BUCKETS]
        with self.ledger.session() as s:
            # automatically released jobs only: a reviewed job's time includes the clinician's
            count, total, *cum = s.execute(select(*cols).where(Job.state == JobState.DONE,
                                                               Job.release == ReleaseMode.AUTO,
                                                               Job.finished_at.is_not(None))).one()
        buckets = [(str(b), float(c)) for b, c in zip(LATENCY_BUCKETS, cum, strict=True)]
        buckets.append(("+Inf", float(count)))
        yield HistogramMetricFamily(f"{PREFIX}_job_latency_seconds",
                                    "End-to-end latency: study complete (job created) to SR and report delivered "
                                    "(automatically released results)",
                                    buckets=buckets, sum_value=float(total))

    def _deliveries(self) -> Iterator[Metric]:
        with self.ledger.session() as s:
            rows = dict(((k, st), n) for k, st, n in s.execute(
                select(Delivery.kind, Delivery.state, func.count()).group_by(Delivery.kind, Delivery.state)))
            attempts = dict(s.execute(select(Delivery.kind, func.coalesce(func.sum(Delivery.attempts), 0))
                                      .group_by(Delivery.kind)).all())
        g = GaugeMetricFamily(f"{PREFIX}_deliveries", "Deliveries (SR to PACS, report to FHIR) by outcome",
                              labels=["kind", "outcome"])
        for kind in DeliveryKind:
            for st in DeliveryState:
                g.add_metric([kind.value, st.value], float(rows.get((kind.value, st.value), 0)))
        yield g
        c = CounterMetricFamily(f"{PREFIX}_delivery_attempts", "Delivery attempts, successful or not",
                                labels=["kind"])
        for kind in DeliveryKind:
            c.add_metric([kind.value], float(attempts.get(kind.value, 0)))
        yield c

    def _drift(self) -> Iterator[Metric]:
        """PSI per model and drift item (README "Drift"), once the model's window of recent jobs is full."""
        value = GaugeMetricFamily(f"{PREFIX}_model_drift_psi",
                                  "Population stability index of a drift item over the model's last window of "
                                  "jobs against its card's reference (> 0.25: drift)",
                                  labels=["model", "version", "item"])
        seen = GaugeMetricFamily(f"{PREFIX}_model_drift_observations",
                                 "Jobs in the model's drift window (PSI is exported once it holds drift.window)",
                                 labels=["model", "version"])
        for m in model_drift(self.ledger, self.settings):
            seen.add_metric([m.model, m.version], float(m.observations))
            if m.full:
                for item in m.items:
                    if item.status is not None:
                        value.add_metric([m.model, m.version, item.item], item.psi)
        yield from (value, seen)


def api_registry(ledger: Ledger, settings: Settings) -> CollectorRegistry:
    """The registry the API serves at /metrics: ledger-derived metrics only."""
    disable_created_metrics()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(ledger, settings))
    return registry
