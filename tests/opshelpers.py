"""Drive a real (SQLite) ledger through the same transitions the listener and the workers make, so the
operator views and actions are tested on states the service really produces."""
from __future__ import annotations

from pathlib import Path

from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import DeliveryKind, InstanceRecord, Stage

OWNER = "test-host:1:task"
NEXT = {Stage.PREPARE: Stage.TIMELINE, Stage.TIMELINE: Stage.INFER, Stage.INFER: Stage.DELIVER}


def add_study(ledger: Ledger, uid: str, n: int = 2, size: int = 1000, series: int = 1,
              files: Path | None = None) -> None:
    """`n` instances of study `uid` in the ledger; their files are written under `files` when given (a
    replay routes the study again and reads its headers), else the paths are made up."""
    for i in range(n):
        ser = f"{uid}.{1 + i % series}"
        path = Path(f"/spool/{uid}/{i}.dcm")
        if files is not None:
            from conftest import write_instance

            path = write_instance(files / uid / f"{i}.dcm", study_uid=uid, series_uid=ser, sop_uid=f"{ser}.{i + 1}",
                                  rows=8)
        ledger.record_instances([InstanceRecord(study_uid=uid, series_uid=ser, sop_uid=f"{ser}.{i + 1}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                               modality="DX", transfer_syntax="1.2.840.10008.1.2.1", path=path,
                               sha256="0" * 64, size=size, calling_ae="MODALITY")])[0]


def complete(ledger: Ledger, uid: str) -> int:
    [job_id] = ledger.complete_studies(quiet_before=None, study_uids=[uid])
    ledger.mark_enqueued(job_id, stage=Stage.PREPARE, lease_seconds=300)
    return job_id


def advance_to(ledger: Ledger, job_id: int, stage: Stage) -> None:
    current = Stage.PREPARE
    while current != stage:
        assert ledger.claim(job_id, stage=current, owner=OWNER, lease_seconds=60) is not None
        assert ledger.advance(job_id, owner=OWNER, next_stage=NEXT[current], lease_seconds=300)
        current = NEXT[current]


def run_to_done(ledger: Ledger, job_id: int, *, report: bool = True) -> None:
    advance_to(ledger, job_id, Stage.DELIVER)
    assert ledger.claim(job_id, stage=Stage.DELIVER, owner=OWNER, lease_seconds=60) is not None
    ledger.set_result(job_id, finding="malignant", probability=0.8, image_only=False, sr_uid=f"2.25.{job_id}")
    ledger.ensure_deliveries(job_id, targets={DeliveryKind.SR: "ORTHANC@pacs:4242",
                                              DeliveryKind.REPORT: "http://fhir/fhir" if report else None})
    ledger.delivery_result(job_id, DeliveryKind.SR, ok=True, remote_id=f"2.25.{job_id}")
    if report:
        ledger.delivery_result(job_id, DeliveryKind.REPORT, ok=True, remote_id=f"DiagnosticReport/r{job_id}")
    ledger.finish(job_id, owner=OWNER)


def run_to_dead(ledger: Ledger, job_id: int, stage: Stage = Stage.PREPARE, reason: str = "prepare: no series") -> None:
    advance_to(ledger, job_id, stage)
    assert ledger.claim(job_id, stage=stage, owner=OWNER, lease_seconds=60) is not None
    if stage == Stage.DELIVER:
        ledger.ensure_deliveries(job_id, targets={DeliveryKind.SR: "ORTHANC@pacs:4242", DeliveryKind.REPORT: None})
        ledger.delivery_result(job_id, DeliveryKind.SR, ok=False, error=reason, dead=True)
    ledger.fail(job_id, owner=OWNER, reason=reason, retry_in=None, lease_seconds=60)


def run_to_failed(ledger: Ledger, job_id: int, stage: Stage = Stage.PREPARE, reason: str = "PACS down") -> None:
    advance_to(ledger, job_id, stage)
    assert ledger.claim(job_id, stage=stage, owner=OWNER, lease_seconds=60) is not None
    ledger.fail(job_id, owner=OWNER, reason=reason, retry_in=30, lease_seconds=300)
