"""The two writers of the listener's batch (SQLAlchemy Core and the sqlite3 driver) write the same rows."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import AuditEvent, Instance, InstanceRecord, Series, Study, utcnow


def rec(study: str, series: str, sop: str, ae: str = "PACS") -> InstanceRecord:
    return InstanceRecord(study_uid=study, series_uid=series, sop_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          modality="CT", transfer_syntax="1.2.840.10008.1.2.1", path=Path(f"/spool/{sop}.dcm"),
                          sha256="ab" * 32, size=len(sop), calling_ae=ae)


def scenario(ledger: Ledger) -> list[list[bool]]:
    news = [
        [o.new for o in ledger.record_instances([rec("1.1", "1.1.1", "1.1.1.1"), rec("1.1", "1.1.1", "1.1.1.2"),
                                                 rec("1.2", "1.2.1", "1.2.1.1", "OTHER")])],
        [o.new for o in ledger.record_instances([rec("1.1", "1.1.2", "1.1.2.1"), rec("1.1", "1.1.1", "1.1.1.1"),
                                                 rec("1.1", "1.1.2", "1.1.2.1")])],
    ]
    assert ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))  # both studies complete
    news.append([o.new for o in ledger.record_instances([rec("1.1", "1.1.1", "1.1.1.3")])])  # reopens 1.1
    return news


def dump(ledger: Ledger) -> dict[str, list[tuple[object, ...]]]:
    with ledger.session() as s:
        return {
            "studies": [(r.id, r.study_uid, r.state, r.instance_count, r.job_version, r.calling_ae,
                         type(r.first_received_at), r.first_received_at <= r.last_received_at)
                        for r in s.scalars(select(Study).order_by(Study.id))],
            "series": [(r.id, r.study_id, r.series_uid, r.modality, r.instance_count)
                       for r in s.scalars(select(Series).order_by(Series.id))],
            "instances": [(r.id, r.study_id, r.series_id, r.sop_uid, r.sop_class_uid, r.transfer_syntax, r.path,
                           r.sha256, r.size, type(r.received_at))
                          for r in s.scalars(select(Instance).order_by(Instance.id))],
            "audit": [(r.entity, r.entity_id, r.event, r.detail, type(r.ts))
                      for r in s.scalars(select(AuditEvent).order_by(AuditEvent.id))],
        }


@pytest.mark.parametrize("fast", [True, False], ids=["sqlite3-driver", "sqlalchemy-core"])
def test_scenario_outcomes(tmp_path: Path, fast: bool) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")
    ledger.fast_sqlite_ingest = fast
    assert scenario(ledger) == [[True, True, True], [True, False, False], [True]]
    rows = dump(ledger)
    assert [r[1:4] for r in rows["studies"]] == [("1.1", "receiving", 4), ("1.2", "complete", 1)]
    assert [r[2:] for r in rows["series"]] == [("1.1.1", "CT", 3), ("1.2.1", "CT", 1), ("1.1.2", "CT", 1)]
    events = [(e[0], e[2]) for e in rows["audit"]]
    assert events.count(("instance", "received")) == 5
    assert ("study", "reopened") in events


def test_both_writers_write_identical_rows(tmp_path: Path) -> None:
    fast = Ledger(f"sqlite:///{tmp_path / 'fast.sqlite'}")
    core = Ledger(f"sqlite:///{tmp_path / 'core.sqlite'}")
    core.fast_sqlite_ingest = False
    assert scenario(fast) == scenario(core)
    assert dump(fast) == dump(core)
    # Timestamps written by the driver compare correctly in SQL (quiet-period queries).
    assert fast.complete_studies(quiet_before=utcnow() - timedelta(seconds=60)) == []
    assert len(fast.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))) == 1


def test_a_failing_before_write_records_nothing(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")

    def boom(_fresh: list[int]) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        ledger.record_instances([rec("1.1", "1.1.1", "1.1.1.1")], before_write=boom)
    assert dump(ledger)["instances"] == [] and dump(ledger)["studies"] == []
    assert ledger.record_instances([rec("1.1", "1.1.1", "1.1.1.1")])[0].new
