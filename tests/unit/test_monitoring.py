"""Operator read models on a real SQLite ledger and the real embedded (filesystem) broker."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from opshelpers import add_study, complete, run_to_dead, run_to_done, run_to_failed
from sqlalchemy import update

from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.errors import StudyNotFoundError
from dicom_fusion.service.jobs.queues import make_celery
from dicom_fusion.service.ops import monitoring
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import InstanceRecord, Job, Stage, utcnow


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "var")


@pytest.fixture
def ledger(settings: Settings) -> Ledger:
    return Ledger(settings.ledger_url)


def test_states_pages_and_filters(ledger: Ledger) -> None:
    add_study(ledger, "1.1")  # still receiving
    for uid in ("1.2", "1.3", "1.4"):
        add_study(ledger, uid)
    run_to_done(ledger, complete(ledger, "1.2"))
    run_to_dead(ledger, complete(ledger, "1.3"))
    complete(ledger, "1.4")
    by_state = monitoring.studies_by_state(ledger)
    assert {k: v for k, v in by_state.items() if v} == {"receiving": 1, "done": 1, "dead": 1, "queued": 1}
    assert list(by_state) == list(monitoring.STUDY_STATES)

    page = monitoring.list_studies(ledger, page=1, page_size=3)
    assert page.total == 4 and len(page.items) == 3
    assert [s.study_uid for s in page.items] == ["1.4", "1.3", "1.2"]  # most recent first
    assert [s.study_uid for s in monitoring.list_studies(ledger, page=2, page_size=3).items] == ["1.1"]
    dead = monitoring.list_studies(ledger, state="dead")
    assert [(s.study_uid, s.error) for s in dead.items] == [("1.3", "prepare: no series")]
    done = monitoring.list_studies(ledger, state="done").items[0]
    assert (done.finding, done.probability, done.job_version) == ("malignant", 0.8, 1)
    assert monitoring.list_studies(ledger, received_after=utcnow() + timedelta(minutes=1)).total == 0
    assert monitoring.list_studies(ledger, received_before=utcnow() + timedelta(minutes=1)).total == 4
    with pytest.raises(ValueError, match="unknown state"):
        monitoring.list_studies(ledger, state="lost")


def test_late_instance_shows_receiving_again(ledger: Ledger) -> None:
    add_study(ledger, "2.1", n=1)
    run_to_done(ledger, complete(ledger, "2.1"))
    ledger.record_instances([InstanceRecord(study_uid="2.1", series_uid="2.1.1", sop_uid="2.1.1.99", sop_class_uid="1.2",
                           modality="CT", transfer_syntax="1.2.840.10008.1.2.1", path=Path("/x"), sha256="0" * 64,
                           size=10, calling_ae="M")])[0]
    assert monitoring.list_studies(ledger).items[0].state == "receiving"
    assert monitoring.study_detail(ledger, "2.1").state == "receiving"


def test_study_detail_history_deliveries_and_stage_times(ledger: Ledger) -> None:
    add_study(ledger, "3.1", n=3, size=500, series=2)
    job = complete(ledger, "3.1")
    run_to_done(ledger, job)
    d = monitoring.study_detail(ledger, "3.1")
    assert (d.state, d.instances, d.bytes, len(d.series)) == ("done", 3, 1500, 2)
    assert d.calling_ae == "MODALITY"
    [j] = d.jobs
    assert j.state == "done" and j.latency_seconds is not None and j.latency_seconds >= 0
    assert {x.kind: x.state for x in j.deliveries} == {"sr": "delivered", "report": "delivered"}
    assert j.report_id == f"DiagnosticReport/r{job}"
    events = [e.event for e in j.history]
    assert events[0] == "complete" and events[-1] == "done" and events.count("stage_done") == 3
    assert set(j.stage_seconds) == {"prepare", "timeline", "infer", "deliver"}
    assert d.errors == []
    with pytest.raises(StudyNotFoundError):
        monitoring.study_detail(ledger, "9.9.9")


def test_errors_collect_job_and_delivery_reasons(ledger: Ledger) -> None:
    add_study(ledger, "4.1")
    run_to_dead(ledger, complete(ledger, "4.1"), stage=Stage.DELIVER, reason="PACS refused the SR")
    d = monitoring.study_detail(ledger, "4.1")
    assert d.errors == ["PACS refused the SR"]
    assert {x.kind: x.state for x in d.jobs[0].deliveries} == {"sr": "dead", "report": "skipped"}
    assert [f.study_uid for f in monitoring.dead_jobs(ledger)] == ["4.1"]


def test_queue_overview_counts_broker_messages_and_ledger_leases(ledger: Ledger, settings: Settings) -> None:
    app = make_celery(settings)
    for uid in ("5.1", "5.2", "5.3"):
        add_study(ledger, uid)
    waiting = complete(ledger, "5.1")
    app.send_task("dicom_fusion.prepare", args=[waiting], queue="cpu")  # a real message in the broker folder
    running = complete(ledger, "5.2")
    assert ledger.claim(running, stage=Stage.PREPARE, owner="w:1:t", lease_seconds=60) is not None
    run_to_failed(ledger, complete(ledger, "5.3"), stage=Stage.TIMELINE)  # backing off before a retry on io
    with ledger.transaction() as s:  # the waiting job was queued 2 minutes ago
        s.execute(update(Job).where(Job.id == waiting).values(updated_at=utcnow() - timedelta(minutes=2)))
    ov = monitoring.queue_overview(ledger, settings)
    q = {x.name: x for x in ov.queues}
    assert ov.broker == "filesystem" and ov.broker_error is None
    assert (q["cpu"].depth, q["cpu"].waiting, q["cpu"].in_flight) == (1, 1, 1)
    assert 110 < (q["cpu"].oldest_waiting_seconds or 0) < 300
    assert (q["io"].depth, q["io"].waiting, q["io"].in_flight) == (0, 1, 0)
    assert (q["gpu"].depth, q["gpu"].waiting, q["gpu"].in_flight, q["gpu"].oldest_waiting_seconds) == (0, 0, 0, None)


def test_queue_overview_reports_an_unreachable_broker(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "var", broker={"url": "redis://127.0.0.1:1/0"})
    ov = monitoring.queue_overview(Ledger(settings.ledger_url), settings)
    assert ov.broker == "redis" and "Redis broker unreachable" in (ov.broker_error or "")
    assert [q.depth for q in ov.queues] == [None, None, None]


def test_throughput_latency_and_failures(ledger: Ledger) -> None:
    now = utcnow()
    jobs = []
    for i, uid in enumerate(("6.1", "6.2", "6.3", "6.4")):
        add_study(ledger, uid, n=i + 1)
        jobs.append(complete(ledger, uid))
    for j in jobs[:3]:
        run_to_done(ledger, j)
    run_to_dead(ledger, jobs[3])
    with ledger.transaction() as s:  # known latencies: 10 s, 20 s, 30 s
        for j, secs in zip(jobs[:3], (10, 20, 30), strict=True):
            s.execute(update(Job).where(Job.id == j).values(created_at=now - timedelta(seconds=secs),
                                                           finished_at=now))
    lat = monitoring.latency(ledger, since=now - timedelta(hours=1))
    assert lat.count == 3 and lat.p50 == pytest.approx(20, abs=0.01) and lat.max == pytest.approx(30, abs=0.01)
    assert lat.p90 == pytest.approx(28, abs=0.01)
    buckets = monitoring.throughput(ledger, now=now + timedelta(seconds=1))
    assert len(buckets) == 12
    assert sum(b.instances for b in buckets) == 1 + 2 + 3 + 4
    assert (sum(b.done for b in buckets), sum(b.dead for b in buckets)) == (3, 1)
    assert buckets[-1].done == 3  # all in the latest 5 minutes
    [failure] = monitoring.recent_failures(ledger)
    assert (failure.study_uid, failure.state, failure.stage) == ("6.4", "dead", "prepare")
