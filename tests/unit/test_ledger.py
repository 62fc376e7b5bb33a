import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import (
    DeliveryKind,
    DeliveryState,
    Instance,
    InstanceRecord,
    JobState,
    Stage,
    utcnow,
)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")


def _receive(ledger: Ledger, study: str, sop: str) -> bool:
    return ledger.record_instances([InstanceRecord(study_uid=study, series_uid=study + ".1", sop_uid=sop,
                                  sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX",
                                  transfer_syntax="1.2.840.10008.1.2.1", path=Path("/x"), sha256="0" * 64,
                                  size=1, calling_ae="PACS")])[0].new


def test_duplicate_instance_is_not_recorded_twice(ledger: Ledger) -> None:
    assert _receive(ledger, "1.1", "1.1.1.1")
    assert not _receive(ledger, "1.1", "1.1.1.1")
    with ledger.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance).where(Instance.sop_uid == "1.1.1.1")) == 1


def test_quiet_period_completes_once(ledger: Ledger) -> None:
    _receive(ledger, "1.1", "1.1.1.1")
    assert ledger.complete_studies(quiet_before=utcnow() - timedelta(seconds=60)) == []
    jobs = ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))
    assert len(jobs) == 1
    assert ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1)) == []
    assert ledger.job(jobs[0]).state == JobState.COMPLETE


def test_late_instance_starts_new_version(ledger: Ledger) -> None:
    _receive(ledger, "1.1", "1.1.1.1")
    [j1] = ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))
    _receive(ledger, "1.1", "1.1.1.2")
    [j2] = ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))
    assert (ledger.job(j1).version, ledger.job(j2).version) == (1, 2)
    assert ledger.job(j2).instance_count == 2


def test_claim_is_exclusive_and_stage_bound(ledger: Ledger) -> None:
    _receive(ledger, "1.1", "1.1.1.1")
    [job] = ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))
    ledger.mark_enqueued(job, stage=Stage.PREPARE, lease_seconds=60)
    assert ledger.job(job).state == JobState.QUEUED
    assert ledger.claim(job, stage=Stage.INFER, owner="w1", lease_seconds=30) is None
    ref = ledger.claim(job, stage=Stage.PREPARE, owner="w1", lease_seconds=30)
    assert ref is not None and ref.study_uid == "1.1"
    assert ledger.claim(job, stage=Stage.PREPARE, owner="w2", lease_seconds=30) is None  # duplicate msg
    assert ledger.advance(job, owner="w1", next_stage=Stage.INFER, lease_seconds=60)
    assert ledger.job(job).state == JobState.INFERRING
    assert ledger.claim(job, stage=Stage.PREPARE, owner="w2", lease_seconds=30) is None  # stale msg


def test_expired_lease_is_reaped_and_reclaimable(ledger: Ledger) -> None:
    _receive(ledger, "1.1", "1.1.1.1")
    [job] = ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))
    ledger.mark_enqueued(job, stage=Stage.PREPARE, lease_seconds=60)
    assert ledger.claim(job, stage=Stage.PREPARE, owner="dead-worker", lease_seconds=0.2)
    assert ledger.expired_jobs() == []
    time.sleep(0.3)
    assert ledger.expired_jobs() == [(job, Stage.PREPARE)]
    assert ledger.claim(job, stage=Stage.PREPARE, owner="w2", lease_seconds=30) is not None


def test_never_enqueued_job_is_reaped(ledger: Ledger) -> None:
    _receive(ledger, "1.1", "1.1.1.1")
    [job] = ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))
    with ledger.transaction() as s:  # pretend it was created a minute ago and the enqueue crashed
        from dicom_fusion.service.storage.models import Job
        s.get(Job, job).created_at = utcnow() - timedelta(seconds=60)
    assert ledger.expired_jobs() == [(job, Stage.PREPARE)]


def test_fail_then_dead_and_redeliver(ledger: Ledger) -> None:
    _receive(ledger, "1.1", "1.1.1.1")
    [job] = ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))
    ledger.claim(job, stage=Stage.PREPARE, owner="w", lease_seconds=30)
    assert ledger.fail(job, owner="w", reason="boom", retry_in=5, lease_seconds=10) == JobState.FAILED
    assert ledger.claim(job, stage=Stage.PREPARE, owner="w", lease_seconds=30) is not None
    assert ledger.fail(job, owner="w", reason="boom", retry_in=None, lease_seconds=10) == JobState.DEAD
    assert ledger.job(job).error == "boom"
    assert ledger.claim(job, stage=Stage.PREPARE, owner="w", lease_seconds=30) is None
    assert ledger.reset_for_redelivery(job)
    assert ledger.claim(job, stage=Stage.PREPARE, owner="w", lease_seconds=30) is not None


def test_delivery_pair_and_audit(ledger: Ledger) -> None:
    _receive(ledger, "1.1", "1.1.1.1")
    [job] = ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))
    ledger.ensure_deliveries(job, targets={DeliveryKind.SR: "PACS@h:1", DeliveryKind.REPORT: "http://f"})
    ledger.ensure_deliveries(job, targets={DeliveryKind.SR: "PACS@h:1", DeliveryKind.REPORT: "http://f"})
    assert sorted(ledger.pending_deliveries(job)) == [DeliveryKind.REPORT, DeliveryKind.SR]
    ledger.delivery_result(job, DeliveryKind.SR, ok=True, remote_id="1.2")
    ledger.delivery_result(job, DeliveryKind.REPORT, ok=False, error="down")
    states = {d.kind: d.state for d in ledger.deliveries(job)}
    assert states == {"sr": DeliveryState.DELIVERED, "report": DeliveryState.FAILED}
    assert ledger.pending_deliveries(job) == [DeliveryKind.REPORT]
    events = [e.event for e in ledger.audit_events("job", job)]
    assert events[0] == JobState.COMPLETE


def test_fhir_disabled_report_is_skipped(ledger: Ledger) -> None:
    _receive(ledger, "1.1", "1.1.1.1")
    [job] = ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))
    ledger.ensure_deliveries(job, targets={DeliveryKind.SR: "PACS@h:1", DeliveryKind.REPORT: None})
    assert ledger.pending_deliveries(job) == [DeliveryKind.SR]


def test_burying_keeps_each_sides_error_and_attempts(ledger: Ledger) -> None:
    _receive(ledger, "1.1", "1.1.1.1")
    [job] = ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))
    ledger.ensure_deliveries(job, targets={DeliveryKind.SR: "PACS@h:1", DeliveryKind.REPORT: "http://f"})
    ledger.delivery_result(job, DeliveryKind.SR, ok=True, remote_id="1.2")
    ledger.delivery_result(job, DeliveryKind.REPORT, ok=False, error="FHIR 503")
    assert ledger.bury_deliveries(job, reason="retries exhausted") == 1
    d = {x.kind: x for x in ledger.deliveries(job)}
    assert d["sr"].state == DeliveryState.DELIVERED
    assert (d["report"].state, d["report"].attempts, d["report"].last_error) == (DeliveryState.DEAD, 1, "FHIR 503")
