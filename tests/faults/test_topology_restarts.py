"""Restarts in the production topology (issue 19, item 3): kill -9 of one piece while studies flow, then
its restart; every study still gets exactly one SR and one DiagnosticReport, and nothing acknowledged
is lost. One topology (tests/topology.py) serves the whole module; ROUNDS rounds per piece: one in `make test`
(FAULT_ROUNDS=3: a round of this module takes ~6 minutes on 2 cores), FAULT_ROUNDS // 3 in `make faults`.

Figures: sent / acknowledged = instances; stored = acknowledged instances found in the ledger; lost =
acknowledged and not in it; duplicates = SRs or reports beyond one per study; crashes = other pieces
that died; recover_s = the longest kill -9 -> every study of the round done (restart included).
"""
from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import FAULT_ROUNDS as _FAULT_ROUNDS
from conftest import Figures, require
from faultlib import report_measure
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select
from topology import Topology, study_files, upload_cohort

from dicom_fusion.inference.synth.generate import SyntheticPatient, generate_cohort
from dicom_fusion.service.demo import components
from dicom_fusion.service.storage.models import Instance, Job, JobState

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(900)]

KINDS = ("listener", "worker-cpu", "worker-io", "worker-gpu", "redis", "postgres", "api")
PER_ROUND = 2  # studies per round
FAULT_ROUNDS = max(1, _FAULT_ROUNDS // 3)  # rounds per piece (see the module docstring) (the listener round sends twice as many, two per association)
# each worker holds its stage's first claim of a job this long, so the kill lands mid-stage (lease held)
PAUSE = {"worker-cpu": "prepare:2", "worker-io": "deliver:2", "worker-gpu": "infer:2"}


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory, orthanc: components.Pacs,
         fhir_server: components.FhirServer) -> Iterator[Topology]:
    require(shutil.which("redis-server") is not None, "redis-server (Debian package redis-server)")
    require(components.postgres_bindir() is not None, "PostgreSQL (Debian package postgresql)")
    tmp = tmp_path_factory.mktemp("topology")
    pg = components.start_postgres(tmp / "postgres")
    redis = components.start_redis(tmp / "redis")
    topology = None
    try:
        # A message lost with Redis (appendfsync everysec) is re-enqueued by the reaper after the queued lease
        topology = Topology.start(tmp / "pieces", pg, redis, orthanc, fhir_server, extra_env={
            "DICOM_FUSION_WORKER__QUEUED_LEASE_SECONDS": "15",
            "DICOM_FUSION_WORKER__REAPER_INTERVAL_SECONDS": "0.5",
            "DICOM_FUSION_SPOOL__MIN_FREE_MB": "100"},
            piece_env={name: {"DICOM_FUSION_FAULT_PAUSE": pause} for name, pause in PAUSE.items()})
        yield topology
    finally:
        if topology is not None:
            topology.stop()
        redis.stop()
        pg.destroy()


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory, fhir_server: components.FhirServer) -> Iterator[SyntheticPatient]:
    cohort = generate_cohort(len(KINDS) * FAULT_ROUNDS * PER_ROUND * 2, tmp_path_factory.mktemp("cohort"), seed=191,
                             progress=False)
    upload_cohort(fhir_server, cohort)
    return iter(cohort)


@dataclass
class Sent:
    acked: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> status
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self) -> set[str]:
        return {uid for uid, st in self.acked.items() if st == 0x0000}


def send(port: int, files: list[Path], sent: Sent, delay: float = 0.0) -> bool:
    """One association (pynetdicom) sending `files`; True when every one was acknowledged with success.
    Stops quietly when the listener dies under it."""
    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title="MODALITY")
    for ctx in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}:
        ae.add_requested_context(*ctx)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DFUSION")
    except Exception:
        return False
    if not assoc.is_established:
        return False
    ok = True
    try:
        for ds in datasets:
            try:
                st = assoc.send_c_store(ds)
            except Exception:
                return False
            if not assoc.is_established or "Status" not in st:
                return False
            with sent.lock:
                sent.acked[str(ds.SOPInstanceUID)] = int(st.Status)
            ok = ok and int(st.Status) == 0
            time.sleep(delay)
        assoc.release()
    except Exception:
        return False
    return ok


def send_until_stored(topo: Topology, files: list[Path], sent: Sent, timeout: float = 60.0) -> float:
    """What a modality does: send the study again until every instance is acknowledged; returns when."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if send(topo.dicom_port, files, sent):
            return time.monotonic()
        time.sleep(0.2)
    raise AssertionError(f"not stored within {timeout:.0f}s: {sent.acked}")


def echo(port: int) -> bool:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="DFUSION")
    if not assoc.is_established:
        return False
    st = assoc.send_c_echo()
    assoc.release()
    return "Status" in st and st.Status == 0


def wait_in_flight(topo: Topology, pid: int | None, timeout: float = 60.0) -> None:
    """Until a job is claimed by process `pid` (any worker when None): the kill lands mid-stage."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with topo.ledger.session() as s:
            owners = s.execute(select(Job.lease_owner).where(Job.state.in_(
                [JobState.PREPARING, JobState.INFERRING, JobState.DELIVERING]))).scalars().all()
        if any(o and (pid is None or f":{pid}:" in o) for o in owners):
            return
        time.sleep(0.05)
    raise AssertionError(f"no job claimed by {pid or 'any worker'} within {timeout:.0f}s")


def check_round(topo: Topology, round_patients: list[SyntheticPatient], sent: Sent, figures: Figures,
                killed_at: float) -> float:
    """Every study done with one SR and one report, every acknowledged instance in the ledger; the
    figures of the round added; returns the recovery time."""
    uids = [p.study_instance_uid for p in round_patients]
    done_at = topo.wait_done(uids, timeout=180)
    with topo.ledger.session() as s:
        stored = set(s.execute(select(Instance.sop_uid).where(Instance.sop_uid.in_(list(sent.ok())))).scalars())
    figures.rounds += 1
    figures.sent += sum(len(study_files(p)) for p in round_patients)
    figures.acknowledged += len(sent.ok())
    figures.stored += len(stored)
    figures.lost += len(sent.ok() - stored)
    states = topo.job_states(uids)
    srs = {p.study_instance_uid: topo.sr_count(p.study_instance_uid) for p in round_patients}
    reports = {p.study_instance_uid: topo.report_count(p) for p in round_patients}
    figures.duplicates += sum(max(0, n - 1) for n in srs.values()) + sum(max(0, n - 1) for n in reports.values())
    crashed = [p.name for p in topo.pieces.values() if not p.alive]
    figures.crashes += len(crashed)
    recover = done_at - killed_at
    figures.recover_s = max(figures.recover_s or 0.0, recover)
    assert sent.ok() <= stored, f"acknowledged but not in the ledger: {sorted(sent.ok() - stored)}"
    assert all(v == [(1, "done")] for v in states.values()), states
    assert set(srs.values()) == {1} and set(reports.values()) == {1}, (srs, reports)
    assert crashed == [], crashed
    return recover


def take(patients: Iterator[SyntheticPatient], n: int) -> list[SyntheticPatient]:
    return [next(patients) for _ in range(n)]


def test_listener_restart(topo: Topology, patients: Iterator[SyntheticPatient], figures: Figures,
                          request: pytest.FixtureRequest) -> None:
    """kill -9 of one of the two listeners while four associations stream (two studies each, an instance
    every 0.25 s); the modalities send again at once (the other listener answers), then it restarts."""
    interrupted = 0
    for _ in range(FAULT_ROUNDS):
        batch = take(patients, 4 * PER_ROUND)
        groups = [[f for p in batch[i::4] for f in study_files(p)] for i in range(4)]
        sent = Sent()
        complete: list[bool] = []
        threads = [threading.Thread(target=lambda g=g: complete.append(send(topo.dicom_port, g, sent, 0.25)))
                   for g in groups]
        for t in threads:
            t.start()
        time.sleep(0.4)
        killed_at = time.monotonic()
        topo.pieces["listener-1"].kill9()
        for t in threads:
            t.join(timeout=60)
        interrupted += complete.count(False)
        for p in batch:  # a study whose instances were not all acknowledged is sent again, whole
            if not {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in study_files(p)} <= sent.ok():
                send_until_stored(topo, study_files(p), sent)
        topo.pieces["listener-1"].start()
        check_round(topo, batch, sent, figures, killed_at)
    report_measure(request.config, "listener_restart",
                   f"{interrupted} of {4 * FAULT_ROUNDS} associations cut by the kill, their studies sent again")


@pytest.mark.parametrize("piece", ["worker-cpu", "worker-io", "worker-gpu"])
def test_worker_restart(topo: Topology, patients: Iterator[SyntheticPatient], figures: Figures, piece: str) -> None:
    """kill -9 of a worker while it holds a job's lease mid-stage; restarted, it releases the dead
    process's leases at start (same host) and the job finishes once."""
    figures.fault = f"{piece}_restart"
    for _ in range(FAULT_ROUNDS):
        batch = take(patients, PER_ROUND)
        sent = Sent()
        for p in batch:
            send_until_stored(topo, study_files(p), sent)
        worker = topo.pieces[piece]
        assert worker.proc is not None
        wait_in_flight(topo, worker.proc.pid)
        killed_at = time.monotonic()
        worker.kill9()
        worker.start()
        check_round(topo, batch, sent, figures, killed_at)


def test_redis_restart(topo: Topology, patients: Iterator[SyntheticPatient], figures: Figures) -> None:
    """kill -9 of Redis with jobs in the pipeline, restarted 2 s later on the same port (append-only file)."""
    for _ in range(FAULT_ROUNDS):
        batch = take(patients, PER_ROUND)
        sent = Sent()
        for p in batch:
            send_until_stored(topo, study_files(p), sent)
        wait_in_flight(topo, None)
        killed_at = time.monotonic()
        topo.redis.kill()
        time.sleep(2)
        topo.redis.restart()
        check_round(topo, batch, sent, figures, killed_at)


def test_postgres_restart(topo: Topology, patients: Iterator[SyntheticPatient], figures: Figures,
                          request: pytest.FixtureRequest) -> None:
    """kill -9 of PostgreSQL (postmaster and its server processes) with jobs in the pipeline; while it is
    down the listeners answer C-STORE with 0xA700 (C-ECHO still answered) and acknowledge nothing; once
    it is back (crash recovery) they store again by themselves, nothing restarted but the database."""
    store_again: list[float] = []
    for _ in range(FAULT_ROUNDS):
        batch = take(patients, PER_ROUND + 1)
        sent = Sent()
        for p in batch[:PER_ROUND]:
            send_until_stored(topo, study_files(p), sent)
        wait_in_flight(topo, None)
        killed_at = time.monotonic()
        topo.pg.kill()
        late = study_files(batch[-1])
        refused = Sent()
        assert not send(topo.dicom_port, late, refused)
        assert set(refused.acked.values()) == {0xA700}, refused.acked
        assert echo(topo.dicom_port)
        time.sleep(1)
        topo.pg.start_again()
        back = time.monotonic()
        store_again.append(send_until_stored(topo, late, sent) - back)
        check_round(topo, batch, sent, figures, killed_at)
    report_measure(request.config, "postgres_restart",
                   f"listener stores again {min(store_again):.2f}-{max(store_again):.2f} s after PostgreSQL accepts "
                   f"connections (0xA700 while it was down), nothing else restarted")


def test_api_restart(topo: Topology, patients: Iterator[SyntheticPatient], figures: Figures) -> None:
    """kill -9 of the API while studies flow: the pipeline does not depend on it; restarted, it answers
    with the ledger's numbers at once."""
    for _ in range(FAULT_ROUNDS):
        batch = take(patients, PER_ROUND)
        sent = Sent()
        killed_at = time.monotonic()
        topo.pieces["api"].kill9()
        for p in batch:
            send_until_stored(topo, study_files(p), sent)
        topo.pieces["api"].start()
        status, _ = topo.api_get("/api/queues")
        assert status == 200
        check_round(topo, batch, sent, figures, killed_at)
        m = topo.metrics()
        assert m[("dicom_fusion_jobs", (("state", "done"),))] == topo.ledger_counts()["jobs_done"]
