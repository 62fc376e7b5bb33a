"""Prometheus metrics: the ledger-derived collector on a real ledger, the listener's per-process
counters on a real listener receiving real C-STOREs, and the worker's task timing."""
from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import write_instance
from opshelpers import add_study, complete, run_to_dead, run_to_done
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import update

from dicom_fusion.service import telemetry
from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.ingest.listener import Listener
from dicom_fusion.service.ops import metrics
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Job, Stage, utcnow
from dicom_fusion.service.storage.spool import Spool


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "var", listener={"port": 0, "allowed_calling_aes": ["GOODSCU"]})


@pytest.fixture
def ledger(settings: Settings) -> Ledger:
    return Ledger(settings.ledger_url)


def scrape(ledger: Ledger, settings: Settings) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.api_registry(ledger, settings)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_ledger_collector_counts_states_deliveries_and_latency(ledger: Ledger, settings: Settings) -> None:
    for uid, n in (("1.1", 2), ("1.2", 3), ("1.3", 1), ("1.4", 1)):
        add_study(ledger, uid, n=n, size=100)
    done = [complete(ledger, u) for u in ("1.1", "1.2", "1.3")]
    for j in done[:2]:
        run_to_done(ledger, j)
    run_to_dead(ledger, done[2], stage=Stage.DELIVER, reason="refused")
    now = utcnow()
    with ledger.transaction() as s:  # latencies 5 s and 45 s
        for j, secs in zip(done[:2], (5, 45), strict=True):
            s.execute(update(Job).where(Job.id == j).values(created_at=now - timedelta(seconds=secs), finished_at=now))
    quarantine = settings.spool_dir / "quarantine"
    quarantine.mkdir(parents=True)
    (quarantine / "x.json").write_text(json.dumps({"reason": "cannot parse"}))

    m = scrape(ledger, settings)
    assert m[("dicom_fusion_instances_received_total", (("result", "stored"),))] == 7
    assert m[("dicom_fusion_instances_received_total", (("result", "quarantined"),))] == 1
    assert m[("dicom_fusion_instance_bytes_total", ())] == 700
    assert m[("dicom_fusion_studies_received_total", ())] == 4
    assert m[("dicom_fusion_jobs_created_total", ())] == 3
    assert m[("dicom_fusion_studies_completed_total", ())] == 2
    assert m[("dicom_fusion_jobs", (("state", "dead"),))] == 1
    assert m[("dicom_fusion_jobs", (("state", "queued"),))] == 0
    assert m[("dicom_fusion_deliveries", (("kind", "sr"), ("outcome", "delivered")))] == 2
    assert m[("dicom_fusion_deliveries", (("kind", "sr"), ("outcome", "dead")))] == 1
    assert m[("dicom_fusion_deliveries", (("kind", "report"), ("outcome", "skipped")))] == 1
    assert m[("dicom_fusion_delivery_attempts_total", (("kind", "sr"),))] == 3
    assert m[("dicom_fusion_queue_depth", (("queue", "cpu"),))] == 0
    assert m[("dicom_fusion_broker_up", ())] == 1
    assert m[("dicom_fusion_job_latency_seconds_count", ())] == 2
    assert m[("dicom_fusion_job_latency_seconds_sum", ())] == pytest.approx(50, abs=0.01)
    assert m[("dicom_fusion_job_latency_seconds_bucket", (("le", "2.5"),))] == 0
    assert m[("dicom_fusion_job_latency_seconds_bucket", (("le", "10.0"),))] == 1
    assert m[("dicom_fusion_job_latency_seconds_bucket", (("le", "60.0"),))] == 2
    assert m[("dicom_fusion_job_latency_seconds_bucket", (("le", "+Inf"),))] == 2


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_listener_counts_store_responses_and_associations(tmp_path: Path, settings: Settings,
                                                           ledger: Ledger) -> None:
    spool = Spool(settings.spool_dir, fsync=False)
    spool.ensure()
    listener = Listener(settings.listener, spool, ledger)
    _, port = listener.start()
    success0 = _value("dicom_fusion_listener_store_responses_total", status="success")
    accepted0 = _value("dicom_fusion_listener_associations_total", event="accepted")
    rejected0 = _value("dicom_fusion_listener_associations_total", event="rejected")
    try:
        telemetry.instrument_listener(listener, settings.metrics)
        files = [write_instance(tmp_path / f"{i}.dcm", study_uid="1.2.3", series_uid="1.2.3.1",
                                sop_uid=f"1.2.3.1.{i}") for i in range(3)]
        ae = AE(ae_title="GOODSCU")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="DFUSION")
        assert assoc.is_established
        for f in files:
            assert assoc.send_c_store(f).Status == 0
        assoc.release()
        bad = AE(ae_title="BADSCU")
        bad.add_requested_context(CTImageStorage)
        assert bad.associate("127.0.0.1", port, ae_title="DFUSION").is_rejected
    finally:
        listener.stop()
    assert _value("dicom_fusion_listener_store_responses_total", status="success") - success0 == 3
    assert _value("dicom_fusion_listener_associations_total", event="accepted") - accepted0 == 1
    assert _value("dicom_fusion_listener_associations_total", event="rejected") - rejected0 == 1


class _Task:
    name = "dicom_fusion.infer"


def test_worker_task_timing_by_stage_and_outcome() -> None:
    def count(outcome: str) -> float:
        return _value("dicom_fusion_task_duration_seconds_count", stage="infer", outcome=outcome)

    ok0, retry0, skipped0 = count("ok"), count("retry"), count("skipped")
    for task_id, state, retval in (("a", "SUCCESS", "deliver"), ("b", "RETRY", None), ("c", "SUCCESS", "skipped")):
        telemetry._task_prerun(task_id=task_id)
        telemetry._task_postrun(task_id=task_id, task=_Task(), retval=retval, state=state)
    assert (count("ok") - ok0, count("retry") - retry0, count("skipped") - skipped0) == (1, 1, 1)
    telemetry.observe_inference("hybrid", "1.0.0", 0.02)
    assert _value("dicom_fusion_model_inference_seconds_count", model="hybrid", version="1.0.0") >= 1


def test_a_busy_metrics_port_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        telemetry._serve(port, "127.0.0.1", "worker")
    assert "cannot bind 127.0.0.1" in caplog.text and "metrics.worker_port" in caplog.text
