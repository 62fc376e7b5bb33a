"""Listener kill -9 during parallel sends: nothing acknowledged is lost, nothing half-written is
recorded, and interrupted studies complete after restart. And kill -9 of `serve` alone (not its process
group) leaves no process behind: its embedded worker and extra listeners die with it (issue 17, item 3)."""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from conftest import FAULT_ROUNDS, Figures
from faultlib import (
    Proc,
    SendLog,
    base_env,
    descendants,
    parallel_send,
    report_measure,
    still_running,
    study_batches,
    verify_spool,
    wait_until,
)

from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Instance, Study

pytestmark = pytest.mark.faults

ASSOCIATIONS = 4
PER_ASSOCIATION = 25


def test_listener_kill9(tmp_path: Path, figures: Figures, raw_send: None) -> None:
    port = free_port()
    data = tmp_path / "var"
    serve = Proc(["serve", "--no-worker"], base_env(data, port), tmp_path / "serve.log", tmp_path)
    sources: dict[str, Path] = {}
    url = f"sqlite:///{data / 'ledger.sqlite'}"
    for rnd in range(FAULT_ROUNDS):
        rng = random.Random(rnd)
        batches, written = study_batches(tmp_path, f"1.2.826.0.1.3680043.8.498.{rnd + 1}", ASSOCIATIONS,
                                         PER_ASSOCIATION)
        sources.update(written)
        try:
            serve.start(wait_port=port)
        except Exception:
            figures.crashes += 1
            raise
        log = SendLog()
        threads = parallel_send(port, batches, log)
        # Kill mid-stream: after a random number of acknowledged instances (machine-speed independent).
        target = rng.randint(5, ASSOCIATIONS * PER_ASSOCIATION - 10)
        wait_until(lambda: len(log.acked) >= target or not any(t.is_alive() for t in threads), 60,
                   "instances acknowledged before the kill", interval=0.005)
        serve.kill9()
        for t in threads:
            t.join(timeout=30)
        ledger = Ledger(url)
        with ledger.session() as s:
            stored = {r.sop_uid for r in s.query(Instance)}
        rows, problems = verify_spool(ledger, sources)
        ledger.close()
        acked = log.success()
        figures.rounds += 1
        figures.sent += log.attempted
        figures.acknowledged += len(acked)
        figures.lost += len(acked - stored)
        assert problems == [], problems
        assert acked <= stored, f"round {rnd}: acknowledged but not stored: {sorted(acked - stored)[:5]}"
    ledger = Ledger(url)
    with ledger.session() as s:
        figures.stored = s.query(Instance).count()
        figures.duplicates = figures.stored - len({r.sop_uid for r in s.query(Instance)})
        studies = s.query(Study).count()
    # After a restart, every interrupted study completes (gets a job) through the quiet period.
    serve.start(wait_port=port)
    try:
        wait_until(lambda: len({j for j in _job_studies(ledger)}) == studies, 60, "every study completed")
    finally:
        serve.stop()
    assert figures.lost == 0 and figures.duplicates == 0


def _job_studies(ledger: Ledger) -> set[int]:
    from dicom_fusion.service.storage.models import Job

    with ledger.session() as s:
        return {j.study_id for j in s.query(Job)}


def test_serve_kill9_leaves_no_process(tmp_path: Path, figures: Figures, request: pytest.FixtureRequest) -> None:
    """`serve` with its embedded worker (ready, polling the broker) and a second listener process;
    kill -9 of the serve process only, FAULT_ROUNDS times: every child must be gone within 5 s."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    serve = Proc(["serve"], base_env(tmp_path / "var", port, DICOM_FUSION_LISTENER__PROCESSES="2"), log_path,
                 tmp_path)
    left: list[int] = []
    children = 0
    gone_after: list[float] = []
    try:
        for _ in range(FAULT_ROUNDS):
            serve.start(wait_port=port)
            assert serve.proc is not None
            ready_before = log_path.read_text(errors="replace").count(" ready.")
            wait_until(lambda n=ready_before: log_path.read_text(errors="replace").count(" ready.") > n, 90,
                       "the embedded worker ready")
            wait_until(lambda: len(descendants(serve.proc.pid)) >= 2, 30, "worker and second listener started")
            procs = descendants(serve.proc.pid)
            children += len(procs)
            os.kill(serve.proc.pid, signal.SIGKILL)  # the process that owns the port, not its group
            serve.proc.wait(timeout=10)
            t0 = time.monotonic()
            deadline = t0 + 5.0
            while still_running(procs) and time.monotonic() < deadline:
                time.sleep(0.02)
            survivors = still_running(procs)
            gone_after.append(time.monotonic() - t0)
            left += survivors
            for pid in survivors:  # clean up, so the next round starts alone
                os.kill(pid, signal.SIGKILL)
            figures.rounds += 1
        report_measure(request.config, "serve_kill9_leaves_no_process",
                       f"{FAULT_ROUNDS} kill -9 of serve alone (embedded worker ready + 1 extra listener, "
                       f"{children} children in all): {len(left)} process(es) left behind; children gone "
                       f"within {max(gone_after):.2f} s")
        figures.crashes = len(left)
        assert left == [], f"processes that outlived serve: {left}"
    finally:
        serve.stop()
