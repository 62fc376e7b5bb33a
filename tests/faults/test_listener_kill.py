"""Listener kill -9 during parallel sends: nothing acknowledged is lost, nothing half-written is
recorded, and interrupted studies complete after restart."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import FAULT_ROUNDS, Figures
from faultlib import Proc, SendLog, base_env, parallel_send, study_batches, verify_spool, wait_until

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
