"""The reaper's fast paths (jobs/reaper.py, Ledger.release_leases): a dead worker's leases are released
by its "host:pid:" and its jobs re-enqueued at once; a starting worker releases those of earlier
processes on its host that no longer run, and leaves a live one's alone."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest

from dicom_fusion.service.jobs.reaper import (
    owner_prefix,
    pid_alive,
    release_dead_worker,
    release_left_by_earlier_workers,
)
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import QUEUED_OWNER, InstanceRecord, JobState, Stage, utcnow

HOST = "node-a"


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")


def _job(ledger: Ledger, n: int, owner: str | None) -> int:
    """A job at prepare whose lease (60 s) is held by `owner` (None: only queued)."""
    study = f"1.2.826.0.1.3680043.8.498.5.{n}"
    ledger.record_instances([InstanceRecord(study_uid=study, series_uid=study + ".1", sop_uid=study + ".1.1",
                                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX",
                                            transfer_syntax="1.2.840.10008.1.2.1", path=Path("/x"),
                                            sha256="0" * 64, size=1, calling_ae="PACS")])
    [job] = ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1), study_uids=[study])
    ledger.mark_enqueued(job, stage=Stage.PREPARE, lease_seconds=60)
    if owner is not None:
        assert ledger.claim(job, stage=Stage.PREPARE, owner=owner, lease_seconds=60) is not None
    return job


def test_release_leases_takes_only_that_pids_unfinished_jobs(ledger: Ledger) -> None:
    dead = _job(ledger, 1, f"{HOST}:12:task-a")
    other_pid = _job(ledger, 2, f"{HOST}:123:task-b")  # "12:" must not match pid 123
    other_host = _job(ledger, 3, "node-b:12:task-c")
    queued = _job(ledger, 4, None)
    finished = _job(ledger, 5, f"{HOST}:12:task-d")
    ledger.finish(finished, owner=f"{HOST}:12:task-d")
    assert ledger.expired_jobs() == []
    assert ledger.release_leases(f"{HOST}:12:") == [dead]
    assert ledger.expired_jobs() == [(dead, Stage.PREPARE)]
    assert ledger.release_leases(f"{HOST}:12:") == []  # already released
    assert "lease_released" in [e.event for e in ledger.audit_events("job", dead)]
    assert ledger.claim(dead, stage=Stage.PREPARE, owner=f"{HOST}:99:task-e", lease_seconds=60) is not None
    for job in (other_pid, other_host):  # still held: a claim is refused
        assert ledger.claim(job, stage=Stage.PREPARE, owner=f"{HOST}:99:x", lease_seconds=60) is None
    assert ledger.job(queued).lease_owner == QUEUED_OWNER and ledger.job(queued).lease_expires > utcnow()
    assert ledger.job(finished).state == JobState.DONE


@pytest.mark.parametrize("prefix", ["node-a:12", "node-a", "node-a:12:task"])
def test_release_leases_refuses_a_prefix_that_is_not_host_pid(ledger: Ledger, prefix: str) -> None:
    with pytest.raises(ValueError, match="host:pid:"):
        ledger.release_leases(prefix)


def test_dead_worker_job_is_reenqueued_at_once(ledger: Ledger) -> None:
    job = _job(ledger, 1, owner_prefix(4242, HOST) + "task")
    survivor = _job(ledger, 2, owner_prefix(4343, HOST) + "task")
    enqueued: list[tuple[int, Stage]] = []
    assert release_dead_worker(ledger, lambda j, s: enqueued.append((j, s)), 4242, HOST) == [job]
    assert enqueued == [(job, Stage.PREPARE)]
    assert release_dead_worker(ledger, lambda j, s: enqueued.append((j, s)), 4444, HOST) == []
    assert enqueued == [(job, Stage.PREPARE)] and survivor not in [j for j, _ in enqueued]


def test_starting_worker_releases_dead_and_own_pids_only(ledger: Ledger) -> None:
    dead = _job(ledger, 1, f"{HOST}:1001:t")
    live = _job(ledger, 2, f"{HOST}:1002:t")
    mine = _job(ledger, 3, f"{HOST}:{os.getpid()}:t")  # an earlier process with this pid (containers)
    elsewhere = _job(ledger, 4, "node-b:1001:t")
    enqueued: list[int] = []
    released = release_left_by_earlier_workers(ledger, lambda j, s: enqueued.append(j), host=HOST,
                                               alive=lambda pid: pid != 1001)
    assert sorted(released) == sorted([dead, mine])
    assert sorted(enqueued) == sorted([dead, mine])
    assert ledger.lease_owner_prefixes(HOST) == {f"{HOST}:1002:"}
    assert ledger.lease_owner_prefixes("node-b") == {"node-b:1001:"}
    assert live not in enqueued and elsewhere not in enqueued


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    assert not pid_alive(child)
