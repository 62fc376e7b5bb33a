"""The ledger on real PostgreSQL (a private cluster per test, migrated with `dicom-fusion db upgrade`):
the SQLAlchemy Core ingest writer, concurrent listeners recording one new study, claims and leases
with PostgreSQL's own isolation (read committed, row locks), and the reaper's lease queries."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_fusion.service.jobs.reaper import release_dead_worker
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import (
    AuditEvent,
    Instance,
    InstanceRecord,
    JobState,
    Series,
    Stage,
    Study,
    utcnow,
)

pytestmark = pytest.mark.integration


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
    assert ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))
    news.append([o.new for o in ledger.record_instances([rec("1.1", "1.1.1", "1.1.1.3")])])  # reopens 1.1
    return news


def dump(ledger: Ledger) -> dict[str, list[tuple[object, ...]]]:
    with ledger.session() as s:
        return {
            "studies": [(r.id, r.study_uid, r.state, r.instance_count, r.job_version, r.calling_ae,
                         r.first_received_at <= r.last_received_at) for r in s.scalars(select(Study).order_by(Study.id))],
            "series": [(r.id, r.study_id, r.series_uid, r.modality, r.instance_count)
                       for r in s.scalars(select(Series).order_by(Series.id))],
            "instances": [(r.id, r.study_id, r.series_id, r.sop_uid, r.sop_class_uid, r.transfer_syntax, r.path,
                           r.sha256, r.size) for r in s.scalars(select(Instance).order_by(Instance.id))],
            "audit": [(r.entity, r.entity_id, r.event, r.detail)
                      for r in s.scalars(select(AuditEvent).order_by(AuditEvent.id))],
        }


def test_migrated_ledger_is_at_head(postgres_ledger: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_FUSION_")}
    env["DICOM_FUSION_LEDGER__URL"] = postgres_ledger
    res = subprocess.run([sys.executable, "-m", "dicom_fusion.service.cli", "db", "current"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "(head)" in res.stdout, res.stdout + res.stderr


def test_core_writer_on_postgres_writes_the_rows_sqlite_gets(postgres_ledger: str, tmp_path: Path) -> None:
    pg = Ledger(postgres_ledger)
    lite = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")
    try:
        assert scenario(pg) == scenario(lite) == [[True, True, True], [True, False, False], [True]]
        assert dump(pg) == dump(lite)
        # timestamps compare in SQL as they do on SQLite (the quiet-period query)
        assert pg.complete_studies(quiet_before=utcnow() - timedelta(seconds=60)) == []
        assert len(pg.complete_studies(quiet_before=utcnow() + timedelta(seconds=1))) == 1
    finally:
        pg.close()
        lite.close()


@pytest.mark.parametrize("same_sop", [False, True], ids=["same-new-study", "same-instance"])
def test_two_listeners_record_one_new_study_at_once(postgres_ledger: str, same_sop: bool) -> None:
    """Listener A has checked for duplicates and known studies; listener B (another process: its own
    connection) has inserted the same new study and series (and an instance of it, or the very same
    instance) and not committed yet. A's insert of the study waits on the unique key, B commits, A's
    insert fails. A's instance must still be recorded (the listener acknowledges it as new), or found a
    duplicate when it is one: never reported a duplicate when it is not, which would discard its file."""
    from dicom_fusion.service.storage.ledger_batch import CoreWriter, record_batch

    a, b = Ledger(postgres_ledger), Ledger(postgres_ledger)
    study = "1.2.826.0.1.3680043.8.498.77"
    b_sop = f"{study}.1.1" if same_sop else f"{study}.1.2"
    calls: list[list[int]] = []
    committed = threading.Event()

    def b_commits_later(conn: object, tx: object) -> None:
        threading.Event().wait(1.0)  # A is blocked on the study's unique key by now
        tx.commit()  # type: ignore[attr-defined]
        conn.close()  # type: ignore[attr-defined]
        committed.set()

    def interleave(fresh: list[int]) -> None:
        calls.append(fresh)
        if len(calls) == 1:
            conn = b.engine.connect()
            tx = conn.begin()
            assert [o.new for o in record_batch(CoreWriter(conn), [rec(study, f"{study}.1", b_sop)], utcnow(),
                                                None)] == [True]
            threading.Thread(target=b_commits_later, args=(conn, tx), daemon=True).start()

    try:
        [outcome] = a.record_instances([rec(study, f"{study}.1", f"{study}.1.1")], before_write=interleave)
        assert committed.is_set()  # the first attempt waited on B's rows and failed; the retry found them
        assert len(calls) == (1 if same_sop else 2)  # a duplicate has no file to make durable on the retry
        d = dump(a)
        sops = sorted(r[3] for r in d["instances"])
        if same_sop:
            assert outcome.new is False and sops == [f"{study}.1.1"]
        else:
            assert outcome.new is True, "acknowledged as a duplicate but not recorded: the instance is lost"
            assert sops == [f"{study}.1.1", f"{study}.1.2"]
            assert [r[3] for r in d["studies"]] == [2] and [r[4] for r in d["series"]] == [2]
    finally:
        a.close()
        b.close()


def _queued_job(ledger: Ledger, n: int) -> int:
    study = f"1.2.826.0.1.3680043.8.498.9.{n}"
    ledger.record_instances([rec(study, study + ".1", study + ".1.1")])
    [job] = ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1), study_uids=[study])
    ledger.mark_enqueued(job, stage=Stage.PREPARE, lease_seconds=60)
    return job


def test_claim_is_exclusive_under_concurrency(postgres_ledger: str) -> None:
    """Eight workers (each its own pool, as separate processes have) claim the same job at the same
    moment: one wins, the others are told no; the loser's later claim of the next stage fails too."""
    ledgers = [Ledger(postgres_ledger) for _ in range(8)]
    try:
        jobs = [_queued_job(ledgers[0], n) for n in range(5)]
        for job in jobs:
            barrier = threading.Barrier(len(ledgers))
            won: list[str] = []

            def claim(i: int, job: int = job, barrier: threading.Barrier = barrier, won: list[str] = won) -> None:
                barrier.wait()
                if ledgers[i].claim(job, stage=Stage.PREPARE, owner=f"host:{100 + i}:t", lease_seconds=60):
                    won.append(f"host:{100 + i}:t")

            threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(ledgers))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert len(won) == 1, won
            assert ledgers[0].job(job).lease_owner == won[0]
    finally:
        for led in ledgers:
            led.close()


def test_leases_and_reaper_on_postgres(postgres_ledger: str) -> None:
    ledger = Ledger(postgres_ledger)
    requeued: list[tuple[int, Stage]] = []
    try:
        dead = _queued_job(ledger, 1)
        live = _queued_job(ledger, 2)
        similar = _queued_job(ledger, 3)
        assert ledger.claim(dead, stage=Stage.PREPARE, owner="node_a:12:t1", lease_seconds=60)
        assert ledger.claim(live, stage=Stage.PREPARE, owner="node_a:13:t2", lease_seconds=60)
        # LIKE wildcards in a host name must not widen the prefix ("_" matches any one character)
        assert ledger.claim(similar, stage=Stage.PREPARE, owner="nodeXa:12:t3", lease_seconds=60)
        assert ledger.expired_jobs() == []
        assert ledger.lease_owner_prefixes("node_a") == {"node_a:12:", "node_a:13:"}
        assert release_dead_worker(ledger, lambda j, s: requeued.append((j, s)), 12, host="node_a") == [dead]
        assert requeued == [(dead, Stage.PREPARE)]
        assert ledger.claim(live, stage=Stage.PREPARE, owner="node_a:99:t", lease_seconds=60) is None
        assert ledger.claim(dead, stage=Stage.PREPARE, owner="node_a:99:t", lease_seconds=60) is not None
        # an expired lease (a worker that stopped renewing) is found by the reaper's query
        assert ledger.claim(similar, stage=Stage.PREPARE, owner="x:1:t", lease_seconds=60) is None
        with ledger.transaction() as s:
            from sqlalchemy import update

            from dicom_fusion.service.storage.models import Job
            s.execute(update(Job).where(Job.id == similar).values(lease_expires=utcnow() - timedelta(seconds=1)))
        assert ledger.expired_jobs() == [(similar, Stage.PREPARE)]
        assert ledger.advance(dead, owner="node_a:99:t", next_stage=Stage.TIMELINE, lease_seconds=60)
        assert ledger.job(dead).state == JobState.PREPARING and ledger.job(dead).stage == Stage.TIMELINE
    finally:
        ledger.close()


def test_drift_observation_is_recorded_once_per_job_and_model_under_concurrency(postgres_ledger: str) -> None:
    """Migration 0007's table on PostgreSQL: eight redelivered infer stages of one job racing to record its drift
    items store one row (the unique (job_id, model_name) decides the race), another model of the job its own."""
    from dicom_fusion.service.storage.models import DriftObservation

    ledger = Ledger(postgres_ledger)
    ledger.record_instances([rec("3.1", "3.1.1", "3.1.1.1")])
    [job_id] = ledger.complete_studies(quiet_before=None, study_uids=["3.1"])
    barrier = threading.Barrier(8)
    outcomes: list[bool] = []

    def record() -> None:
        other = Ledger(postgres_ledger)
        barrier.wait()
        outcomes.append(other.record_drift(job_id, model_name="m", model_version="1", items={"image.mean": 1.0}))
        other.close()

    threads = [threading.Thread(target=record) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [False] * 7 + [True]
    assert ledger.record_drift(job_id, model_name="other", model_version="2", items={"probability": 0.5})
    with ledger.session() as s:
        rows = [(o.model_name, o.items) for o in s.scalars(select(DriftObservation).order_by(DriftObservation.id))]
    assert rows == [("m", '{"image.mean": 1.0}'), ("other", '{"probability": 0.5}')]
    ledger.close()
