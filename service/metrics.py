"""Prometheus metrics.

Two kinds, because the listener, the workers and the API are separate processes:

* **Ledger-derived** (:class:`LedgerCollector`, served by the API's ``/metrics``): counts, states,
  queue depths and end-to-end latency, computed from the ledger (and the broker) at scrape time.
  They are the same whichever process asks, and they survive restarts.
* **Per-process** (served on ``[metrics] listener_port`` / ``worker_port``, 0 = off): what only that
  process sees — DICOM responses and associations in the listener; task durations per stage, model
  inference time and GPU memory in a worker.

Label values are stage, queue, state, status and model names only — never a patient identifier
(and not even a UID: those would make unbounded series).
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, extract, func, select

from dicom_fusion.service.config import MetricsSettings, Settings
from dicom_fusion.service.ledger import Delivery, DeliveryKind, DeliveryState, Instance, Job, JobState, Ledger, Study
from dicom_fusion.service.monitoring import queue_overview

log = logging.getLogger(__name__)

PREFIX = "dicom_fusion"
LATENCY_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STORE_STATUS = {0x0000: "success", 0xA700: "out_of_resources", 0xA900: "mismatch", 0xC000: "cannot_understand"}

# ---- per-process metrics (default registry of the listener / worker process) -------------------
STORE_RESPONSES = Counter(f"{PREFIX}_listener_store_responses", "C-STORE responses sent by the listener, by status",
                          ["status"])
ASSOCIATIONS = Counter(f"{PREFIX}_listener_associations", "Associations seen by the listener, by event",
                       ["event"])
TASK_DURATION = Histogram(f"{PREFIX}_task_duration_seconds", "Duration of a stage task in a worker",
                          ["stage", "outcome"], buckets=TASK_BUCKETS)
INFERENCE_SECONDS = Histogram(f"{PREFIX}_model_inference_seconds", "Model forward pass time per study",
                              ["model", "version"], buckets=INFERENCE_BUCKETS)
GPU_MEMORY = f"{PREFIX}_gpu_memory_bytes"
PROCESS_METRICS = (STORE_RESPONSES, ASSOCIATIONS, TASK_DURATION, INFERENCE_SECONDS)


def _serve(port: int, host: str, what: str) -> None:
    """Start the endpoint; a port that cannot be bound is logged, never fatal (ingest and tasks go on)."""
    disable_created_metrics()
    if not port:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.error("%s metrics endpoint not started: cannot bind %s:%s (%s); set metrics.%s_port to a free "
                  "port or 0", what, host, port, exc.strerror, what)
        return
    log.info("%s metrics on http://%s:%s/metrics", what, host, port)


# ---- listener -------------------------------------------------------------------------------
def _on_dimse_sent(event: Any) -> None:
    msg = event.message
    if type(msg).__name__ == "C_STORE_RSP":
        status = msg.command_set.Status
        STORE_RESPONSES.labels(status=_STORE_STATUS.get(int(status) if status is not None else -1, "other")).inc()


def _on_association(event: Any, name: str) -> None:
    ASSOCIATIONS.labels(event=name).inc()


def instrument_listener(listener: Any, settings: MetricsSettings) -> None:
    """Count C-STORE responses and associations of a started :class:`~.listener.Listener` (observers
    only: the store handler is untouched), and serve them on ``metrics.listener_port``."""
    from pynetdicom import evt

    server = listener.server
    if server is None:
        raise RuntimeError("instrument_listener needs a started listener")
    server.bind(evt.EVT_DIMSE_SENT, _on_dimse_sent)
    for event, name in ((evt.EVT_ACCEPTED, "accepted"), (evt.EVT_REJECTED, "rejected"),
                        (evt.EVT_ABORTED, "aborted"), (evt.EVT_RELEASED, "released")):
        server.bind(event, _on_association, [name])
    _serve(settings.listener_port, settings.host, "listener")


# ---- worker ---------------------------------------------------------------------------------
_started: dict[str, float] = {}


def _stage_of(task_name: str) -> str | None:
    prefix = "dicom_fusion."
    return task_name[len(prefix):] if task_name.startswith(prefix) else None


def _task_prerun(task_id: str = "", **_: Any) -> None:
    _started[task_id] = time.perf_counter()


def _task_postrun(task_id: str = "", task: Any = None, retval: Any = None, state: str = "", **_: Any) -> None:
    began = _started.pop(task_id, None)
    stage = _stage_of(getattr(task, "name", "") or "")
    if began is None or stage is None:
        return
    if state == "SUCCESS":
        outcome = retval if retval in ("skipped", "dead") else "ok"
    else:
        outcome = "retry" if state == "RETRY" else "error"
    TASK_DURATION.labels(stage=stage, outcome=outcome).observe(time.perf_counter() - began)


def observe_inference(model: str, version: str, seconds: float) -> None:
    INFERENCE_SECONDS.labels(model=model, version=version).observe(seconds)


class GpuCollector(Collector):
    """CUDA memory of this process, when torch is loaded and a GPU is present."""

    def collect(self) -> Iterator[Metric]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        g = GaugeMetricFamily(GPU_MEMORY, "CUDA memory of this worker process", labels=["device", "kind"])
        for i in range(torch.cuda.device_count()):
            g.add_metric([f"cuda:{i}", "allocated"], float(torch.cuda.memory_allocated(i)))
            g.add_metric([f"cuda:{i}", "reserved"], float(torch.cuda.memory_reserved(i)))
        yield g


def install_worker_metrics(settings: Settings, *, pool: str) -> None:
    """Time every stage task (Celery signals) and serve the worker's metrics on ``metrics.worker_port``.

    With ``worker.pool = prefork`` tasks run in child processes whose metrics this endpoint cannot
    see, so it stays off (scale with more solo/threads workers instead)."""
    from celery.signals import task_postrun, task_prerun
    from prometheus_client import REGISTRY

    task_prerun.connect(_task_prerun, weak=False)
    task_postrun.connect(_task_postrun, weak=False)
    if not settings.metrics.worker_port:
        return
    if pool == "prefork":
        log.warning("metrics.worker_port is ignored with worker.pool=prefork (child processes); use solo or threads")
        return
    REGISTRY.register(GpuCollector())
    _serve(settings.metrics.worker_port, settings.metrics.host, "worker")


# ---- ledger-derived (API) -------------------------------------------------------------------
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
            count, total, *cum = s.execute(select(*cols).where(Job.state == JobState.DONE,
                                                               Job.finished_at.is_not(None))).one()
        buckets = [(str(b), float(c)) for b, c in zip(LATENCY_BUCKETS, cum, strict=True)]
        buckets.append(("+Inf", float(count)))
        yield HistogramMetricFamily(f"{PREFIX}_job_latency_seconds",
                                    "End-to-end latency: study complete (job created) to SR and report delivered",
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


def api_registry(ledger: Ledger, settings: Settings) -> CollectorRegistry:
    """The registry the API serves at /metrics: ledger-derived metrics only."""
    disable_created_metrics()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(ledger, settings))
    return registry
