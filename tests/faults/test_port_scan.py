"""A port scan cannot stop ingest: 500 scanner connections (connect+close, junk bytes, truncated
A-ASSOCIATE-RQ, a valid PDU header then silence) from 10 parallel clients, then a C-ECHO answered within
1 s and a C-STORE acknowledged; connections that never speak are closed after
``listener.handshake_timeout`` and never take an association slot; a peer is held to
``listener.max_associations_per_peer``; each peer's refusals are logged once a minute; the listener's RSS
comes back to within 10 MB.

Loopback only. The scanner binds 127.0.0.2 and 127.0.0.3, the PACS 127.0.0.1 (Linux routes all of
127/8 to lo), so the per-peer limits are seen as they would be on a network.
"""
from __future__ import annotations

import gc
import selectors
import socket
import time
from pathlib import Path

import pytest
from conftest import Figures, write_instance
from faultlib import (
    Proc,
    SendLog,
    association_rq,
    base_env,
    echo_from,
    report_measure,
    rss_kb,
    scan_burst,
    send_files,
    wait_until,
)

from dicom_fusion.service.demo.components import free_port

pytestmark = pytest.mark.faults

CONNECTIONS = 500
CLIENTS = 10
SCANNER, SCANNER_2, PACS = "127.0.0.2", "127.0.0.3", "127.0.0.1"
HANDSHAKE_TIMEOUT = 5.0  # the default
PER_PEER = 8  # the default


def _first_echo(port: int, source: str, limit: float) -> float:
    """Seconds until a C-ECHO from `source` is answered (one try after another)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if echo_from(port, source, timeout=limit):
            return time.monotonic() - t0
        time.sleep(0.05)
    return float("inf")


def _closed_at(socks: list[socket.socket], limit: float) -> list[float]:
    """When (time.monotonic()) the listener answered or closed each socket, all watched at once (an
    answer or EOF makes a socket readable); the sockets are closed on return."""
    at: dict[socket.socket, float] = {}
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        end = time.monotonic() + limit
        while len(at) < len(socks) and time.monotonic() < end:
            for key, _ in sel.select(timeout=end - time.monotonic()):
                at[key.fileobj] = time.monotonic()  # type: ignore[index]
                sel.unregister(key.fileobj)
    for s in socks:
        s.close()
    return [at.get(s, float("inf")) for s in socks]


def _store(port: int, path: Path) -> int | None:
    log = SendLog()
    send_files(port, [path], log)
    return log.acked.get(path.stem)


def test_port_scan(tmp_path: Path, figures: Figures, raw_send: None, request: pytest.FixtureRequest) -> None:
    port = free_port()
    serve = Proc(["serve", "--no-worker"], base_env(tmp_path / "var", port), tmp_path / "serve.log",
                 tmp_path).start(wait_port=port)
    assert serve.proc is not None
    try:
        study = "1.2.826.0.1.3680043.8.498.71"
        files = [write_instance(tmp_path / "in" / f"{study}.1.{i}.dcm", study_uid=study,
                                series_uid=f"{study}.1", sop_uid=f"{study}.1.{i}", rows=512) for i in (1, 2)]
        # warm up (imports, first association, first commit), then the baseline RSS
        assert echo_from(port, PACS)
        assert _store(port, files[0]) == 0x0000
        time.sleep(0.5)
        rss_before = rss_kb(serve.proc.pid)

        burst_s = scan_burst(port, CONNECTIONS, CLIENTS, source=SCANNER)
        echo_scanner_s = _first_echo(port, SCANNER, 40)
        echo_pacs_s = _first_echo(port, PACS, 40)
        stored = _store(port, files[1])

        # connections that send a valid header and then nothing, held open by the scanner
        rq = association_rq()
        held: list[socket.socket] = []
        opened = time.monotonic()
        for _ in range(PER_PEER + 4):
            s = socket.socket()
            s.bind((SCANNER_2, 0))
            s.connect(("127.0.0.1", port))
            s.sendall(rq[:6])
            held.append(s)
        echo_while_held_s = _first_echo(port, PACS, 40)
        closed_at = [t - opened for t in _closed_at(held, HANDSHAKE_TIMEOUT + 10)]
        refused_at_once = sum(1 for t in closed_at if t < 1.0)
        held_closed_s = max(closed_at)

        gc.collect()
        time.sleep(1.0)
        rss_after = rss_kb(serve.proc.pid)
        serve_log = (tmp_path / "serve.log").read_text(errors="replace")
        refusal_lines = {peer: sum(1 for line in serve_log.splitlines() if "refused" in line and peer in line)
                         for peer in (SCANNER, SCANNER_2)}

        figures.rounds = 1
        figures.sent = CONNECTIONS + len(held) + len(files)
        figures.acknowledged = figures.stored = 1 + int(stored == 0x0000)
        figures.crashes = int(not serve.alive)
        delta_mb = (rss_after - rss_before) / 1024
        report_measure(request.config, "port_scan",
                       f"{CONNECTIONS} connections from {CLIENTS} clients in {burst_s:.1f} s; first C-ECHO "
                       f"after the burst {echo_scanner_s:.2f} s (scanner's address), {echo_pacs_s:.2f} s "
                       f"(PACS); C-ECHO while {len(held)} silent connections are open "
                       f"{echo_while_held_s:.2f} s; "
                       f"silent connections closed after {held_closed_s:.1f} s ({refused_at_once} refused at "
                       f"once); listener RSS {rss_before / 1024:.1f} → {rss_after / 1024:.1f} MB "
                       f"({delta_mb:+.1f} MB); "
                       f"refusal log lines per peer {refusal_lines}")

        assert serve.alive
        assert echo_scanner_s < 1.0 and echo_pacs_s < 1.0
        assert stored == 0x0000
        assert echo_while_held_s < 1.0
        assert refused_at_once == len(held) - PER_PEER  # the peer's pending connections over its limit
        assert held_closed_s < HANDSHAKE_TIMEOUT + 1.5
        assert abs(delta_mb) < 10, f"listener RSS changed by {delta_mb:.1f} MB"
        assert refusal_lines == {SCANNER: 1, SCANNER_2: 1}, refusal_lines
        wait_until(lambda: echo_from(port, SCANNER), 5, "the scanner's address served again")
    finally:
        serve.stop()
