"""Two listener processes on one port (`listener.processes = 2`, SO_REUSEPORT): both take associations,
every acknowledged instance is in the ledger once, and a kill -9 of `serve` alone (not its process group)
takes the extra listener down with it (PR_SET_PDEATHSIG), losing nothing acknowledged."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import Figures
from faultlib import Proc, SendLog, base_env, parallel_send, study_batches, verify_spool, wait_until

from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Instance

pytestmark = pytest.mark.faults


def _listen_children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"listen" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _listening_sockets(port: int) -> int:
    """LISTEN sockets bound to ``port`` (IPv4), from /proc/net/tcp: 2 once both processes have bound."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":
            n += 1
    return n


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_two_listener_processes_share_the_port_and_die_with_serve(tmp_path: Path, figures: Figures,
                                                                  raw_send: None) -> None:
    port = free_port()
    data = tmp_path / "var"
    # 12 associations from one address: with the default per-peer limit of 8 *per process*, the kernel's
    # spread put 9 or more on one process in ~15 % of runs and that one refused the rest (a flake seen in a
    # clean-clone run); the per-peer limit has its own tests (test_connections.py, the port-scan fault).
    env = base_env(data, port, DICOM_FUSION_LISTENER__PROCESSES="2",
                   DICOM_FUSION_COMPLETION__QUIET_SECONDS="3600",
                   DICOM_FUSION_LISTENER__MAX_ASSOCIATIONS_PER_PEER="16")
    serve = Proc(["serve", "--no-worker"], env, tmp_path / "serve.log", tmp_path)
    serve.start(wait_port=port)
    try:
        assert serve.proc is not None
        wait_until(lambda: len(_listen_children(serve.proc.pid)) == 1, 60, "the second listener process")
        (child,) = _listen_children(serve.proc.pid)
        wait_until(lambda: _listening_sockets(port) == 2, 60, "both processes listening on the port")
        # Round 1: 12 associations; the kernel spreads them over both sockets (all on one: p = 2^-11).
        batches, sources = study_batches(tmp_path, "1.2.826.0.1.3680043.8.498.77.1", 12, 5)
        idle = _cpu_ticks(child)
        log = SendLog()
        for t in parallel_send(port, batches, log):
            t.join(60)
        assert len(log.success()) == 60, f"{len(log.success())} of 60 acknowledged; see {tmp_path / 'serve.log'}"
        assert _cpu_ticks(child) - idle >= 5, "the second listener process took no association"
        # Round 2: kill -9 of serve alone, mid-stream.
        more, more_sources = study_batches(tmp_path, "1.2.826.0.1.3680043.8.498.77.2", 4, 25)
        sources.update(more_sources)
        log2 = SendLog()
        threads = parallel_send(port, more, log2)
        wait_until(lambda: len(log2.acked) >= 20 or not any(t.is_alive() for t in threads), 60,
                   "instances acknowledged before the kill", interval=0.005)
        os.kill(serve.proc.pid, signal.SIGKILL)
        serve.proc.wait(timeout=10)
        wait_until(lambda: not _alive(child), 30, "the extra listener to die with serve")
        for t in threads:
            t.join(30)
    finally:
        serve.stop()
        if serve.proc is not None:
            for pid in _listen_children(serve.proc.pid):
                os.kill(pid, signal.SIGKILL)
    ledger = Ledger(f"sqlite:///{data / 'ledger.sqlite'}")
    try:
        with ledger.session() as s:
            stored = [r.sop_uid for r in s.query(Instance)]
        _, problems = verify_spool(ledger, sources)
    finally:
        ledger.close()
    acked = log.success() | log2.success()
    figures.rounds += 1
    figures.sent += log.attempted + log2.attempted
    figures.acknowledged += len(acked)
    figures.stored += len(stored)
    figures.lost += len(acked - set(stored))
    figures.duplicates += len(stored) - len(set(stored))
    assert problems == [], problems
    assert acked <= set(stored) and len(stored) == len(set(stored))
