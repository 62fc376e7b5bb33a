"""Logging set-up, and the per-process Prometheus metrics: what only one listener or worker process sees.

DICOM responses and associations in the listener; task durations per stage, model inference time and
GPU memory in a worker. Each process serves its own (``[metrics] listener_port`` / ``worker_port``,
0 = off). The ledger-derived metrics that any process can compute live in
:mod:`dicom_fusion.service.ops.metrics`. This module sits below every stage (ingest and jobs record
into it) and imports nothing of the service but config.

Label values are stage, outcome, status and model names only: never a patient identifier (and not
even a UID: those would make unbounded series).
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_fusion.service.config import MetricsSettings, Settings

log = logging.getLogger(__name__)


def configure_logging(level: str) -> None:
    """Root logging to stderr; the libraries that would log patient data are held at WARNING."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # pynetdicom's INFO/DEBUG output echoes association details and, at DEBUG, whole datasets (PHI).
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # httpx logs full request URLs at INFO, and FHIR search URLs carry patient identifiers.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


PREFIX = "dicom_fusion"
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
