"""Concurrency on a PostgreSQL ledger (issue 19, item 4), with PostgreSQL's own isolation (read committed,
row locks) and separate processes where production has them:

- two worker processes claim the same job at the same moment, 50 times: exactly one wins each race;
- two reapers (two `serve` processes) over the same expired leases publish one message per expiry;
- a reaper whose list of expired jobs went stale never takes the lease of a worker that claimed the job
  since (that second message would let two workers run one stage, e.g. deliver, at once);
- a worker handing its stage on and a reaper re-enqueueing the same expired lease: never both.

A duplicate message that does get through is harmless by design (the claim refuses it; the deliver stage
sends only sides not yet delivered, the SR UID is derived, the FHIR report is a conditional create);
these tests check that the ledger does not hand one stage to two workers in the first place.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, update

from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.demo.components import RedisServer
from dicom_fusion.service.jobs.queues import enqueue, make_celery, stage_queue
from dicom_fusion.service.jobs.reaper import reap
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import InstanceRecord, Job, Stage, utcnow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RACES = 50
EXPIRED = 40


def _rec(study: str) -> InstanceRecord:
    return InstanceRecord(study_uid=study, series_uid=study + ".1", sop_uid=study + ".1.1",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.2", modality="CT",
                          transfer_syntax="1.2.840.10008.1.2.1", path=Path(f"/spool/{study}.dcm"),
                          sha256="ab" * 32, size=10, calling_ae="PACS")


def _jobs(ledger: Ledger, n: int, tag: int) -> list[int]:
    """`n` jobs waiting at prepare: one study each, completed in one call."""
    studies = [f"1.2.826.0.1.3680043.8.498.19.{tag}.{i}" for i in range(n)]
    ledger.record_instances([_rec(s) for s in studies])
    jobs = ledger.complete_studies(quiet_before=utcnow() + timedelta(seconds=1), study_uids=studies)
    assert len(jobs) == n
    return jobs


def _expire(ledger: Ledger, job_ids: list[int], owner: str = "deadhost:1:t") -> None:
    """The jobs' leases held by a worker that is gone and ran out a second ago."""
    with ledger.transaction() as s:
        s.execute(update(Job).where(Job.id.in_(job_ids)).values(
            lease_owner=owner, lease_expires=utcnow() - timedelta(seconds=1)))


@pytest.fixture
def settings(postgres_ledger: str, redis_server: RedisServer, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("DICOM_FUSION_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("DICOM_FUSION_LEDGER__URL", postgres_ledger)
    monkeypatch.setenv("DICOM_FUSION_BROKER__URL", redis_server.url)
    monkeypatch.delenv("DICOM_FUSION_CONFIG", raising=False)
    return load_settings()


@pytest.fixture
def ledger(settings: Settings) -> Iterator[Ledger]:
    led = Ledger(settings.ledger_url)
    yield led
    led.close()


def _published(redis_server: RedisServer, stage: Stage) -> list[int]:
    """Job ids of the task messages waiting in the stage's (normal priority) Redis queue."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        raw = client.lrange(stage_queue(stage), 0, -1)
    finally:
        client.close()
    return sorted(int(json.loads(_body(m))[0][0]) for m in raw)  # Celery protocol 2: [args, kwargs, embed]


def _body(message: bytes) -> str:
    import base64

    envelope = json.loads(message)
    body = envelope["body"]
    return base64.b64decode(body).decode() if envelope["properties"].get("body_encoding") == "base64" else body


# ---- two worker processes racing for one claim ------------------------------------------------------
def _claimer(url: str, name: str, jobs: list[int], barrier: Any, out: Any) -> None:
    """A worker process: its own engine and connections; claims each job when both are at the barrier."""
    ledger = Ledger(url)
    try:
        ledger.job(jobs[0])  # connect before the first race, so the race is between the UPDATEs
        for job in jobs:
            barrier.wait(timeout=30)
            ref = ledger.claim(job, stage=Stage.PREPARE, owner=f"{name}:{mp.current_process().pid}:t",
                               lease_seconds=60)
            out.put((job, name, ref is not None))
    finally:
        ledger.close()


def test_two_worker_processes_racing_for_a_job_one_wins_each_time(ledger: Ledger, settings: Settings) -> None:
    """50 races between two worker processes, released together by a barrier before every claim: half
    over a job just enqueued (lease `queued`), half over a job whose worker died (lease expired). Each
    time exactly one claim succeeds and the ledger names the winner as the lease's owner."""
    jobs = _jobs(ledger, RACES, 1)
    for job in jobs[::2]:
        ledger.mark_enqueued(job, stage=Stage.PREPARE, lease_seconds=60)
    _expire(ledger, jobs[1::2])
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(settings.ledger_url, name, jobs, barrier, out))
             for name in ("hostA", "hostB")]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in range(2 * RACES)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    wins: dict[int, list[str]] = {job: [] for job in jobs}
    for job, name, won in results:
        if won:
            wins[job].append(name)
    assert {job: len(w) for job, w in wins.items() if len(w) != 1} == {}, "a race with no or two winners"
    for job, [name] in wins.items():
        assert (ledger.job(job).lease_owner or "").startswith(f"{name}:")
    spread = sum(w == ["hostA"] for w in wins.values())
    print(f"claim races: {RACES}, one winner each; hostA won {spread}, hostB {RACES - spread}")


# ---- two reapers -------------------------------------------------------------------------------------
def _reaper(settings: Settings, barrier: Any, out: Any) -> None:
    """One `serve` process's reaper pass, with serve's re-enqueue (`expired_only`)."""
    ledger = Ledger(settings.ledger_url)
    app = make_celery(settings)
    try:
        ledger.expired_jobs()  # connected
        barrier.wait(timeout=30)
        out.put(reap(ledger, lambda j, s: enqueue(app, ledger, settings, j, s, requeue=True, expired_only=True)))
    finally:
        ledger.close()


def test_two_reapers_publish_each_expired_lease_once(ledger: Ledger, settings: Settings,
                                                     redis_server: RedisServer) -> None:
    """Two `serve` processes reap the same 40 expired leases at the same moment: 40 messages in the broker,
    one per job (each would otherwise be published twice, and a message is a worker that may run the stage)."""
    jobs = _jobs(ledger, EXPIRED, 2)
    _expire(ledger, jobs)
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_reaper, args=(settings, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    counts = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sum(counts) == EXPIRED, counts
    assert _published(redis_server, Stage.PREPARE) == sorted(jobs)
    assert ledger.expired_jobs() == []
    print(f"two reapers over {EXPIRED} expired leases: re-enqueued {counts[0]} + {counts[1]}, "
          f"{EXPIRED} messages published")


def test_a_stale_reaper_never_takes_a_lease_claimed_since(ledger: Ledger, settings: Settings,
                                                          redis_server: RedisServer) -> None:
    """Reaper A lists the expired job; reaper B (another `serve`) re-enqueues it and worker 2 claims it;
    then A reaches the job in its list. A must skip it: re-marking it queued would take worker 2's lease
    and its message would let worker 3 run the same stage at the same time."""
    [job] = _jobs(ledger, 1, 3)
    _expire(ledger, [job])
    app = make_celery(settings)
    reaper_a, reaper_b = Ledger(settings.ledger_url), Ledger(settings.ledger_url)
    try:
        stale = reaper_a.expired_jobs()
        assert stale == [(job, Stage.PREPARE)]

        def requeue(led: Ledger) -> Any:
            return lambda j, s: enqueue(app, led, settings, j, s, requeue=True, expired_only=True)

        assert reap(reaper_b, requeue(reaper_b)) == 1
        assert ledger.claim(job, stage=Stage.PREPARE, owner="host:2:t", lease_seconds=60) is not None
        reaper_a.expired_jobs = lambda: stale  # type: ignore[method-assign]  # A's pass, read before B's
        assert reap(reaper_a, requeue(reaper_a)) == 0
        assert ledger.job(job).lease_owner == "host:2:t"
        assert ledger.claim(job, stage=Stage.PREPARE, owner="host:3:t", lease_seconds=60) is None
        assert _published(redis_server, Stage.PREPARE) == [job]
    finally:
        reaper_a.close()
        reaper_b.close()


def test_a_worker_handing_on_and_a_reaper_never_both_win(ledger: Ledger, settings: Settings) -> None:
    """Worker 1's lease ran out while it finished prepare (a stalled process). It checks that it still owns
    the job and hands it to timeline; between that check and its write, a reaper re-enqueues the expired
    lease and worker 2 claims prepare. Without a row lock both succeed: worker 2 runs prepare again
    while worker 1's write moves the job on under it. With it, the reaper waits for worker 1's commit,
    then finds the job at timeline and leaves it."""
    [job] = _jobs(ledger, 1, 4)
    ledger.mark_enqueued(job, stage=Stage.PREPARE, lease_seconds=60)
    assert ledger.claim(job, stage=Stage.PREPARE, owner="host:1:t", lease_seconds=60) is not None
    _expire(ledger, [job], owner="host:1:t")
    other = Ledger(settings.ledger_url)
    won: dict[str, object] = {}

    def reaper_and_worker_2() -> None:
        won["requeued"] = other.mark_enqueued(job, stage=Stage.PREPARE, lease_seconds=60, requeue=True,
                                              expired_only=True)
        won["worker 2"] = other.claim(job, stage=Stage.PREPARE, owner="host:2:t", lease_seconds=60) is not None

    racer = threading.Thread(target=reaper_and_worker_2, daemon=True)
    started = threading.Event()

    def between_check_and_write(*_: object) -> None:
        if not started.is_set():
            started.set()
            racer.start()
            racer.join(timeout=2)  # finishes at once without the row lock; blocks on it with the lock

    event.listen(ledger._write_sessions, "before_flush", between_check_and_write)
    try:
        won["worker 1"] = ledger.advance(job, owner="host:1:t", next_stage=Stage.TIMELINE, lease_seconds=60)
        event.remove(ledger._write_sessions, "before_flush", between_check_and_write)
        racer.join(timeout=30)
        assert not racer.is_alive()
        assert won["worker 1"] is True
        assert won["worker 2"] is False and won["requeued"] is None, won
        assert ledger.job(job).stage == Stage.TIMELINE
    finally:
        other.close()
