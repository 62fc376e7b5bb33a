"""Connection hygiene of the listener (ingest/connections.py) on loopback, at a small scale and with short
timeouts: junk and closed connections free their slot at once, a silent one is closed after
``listener.handshake_timeout`` and never takes an association slot, a peer is held to
``listener.max_associations_per_peer``, and over TLS a silent peer does not stall the accept loop.
The 500-connection burst is tests/faults/test_port_scan.py."""
from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool
from pdus import association_rq
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_fusion.service.config import ListenerSettings, TLSSettings
from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.ingest.connections import ASSOCIATE_RJ_LOCAL_LIMIT
from dicom_fusion.service.ingest.listener import Listener
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.spool import Spool

pytestmark = pytest.mark.integration

PACS, SCANNER = "127.0.0.1", "127.0.0.2"
HEADER = bytes([0x01, 0x00, 0x00, 0x00, 0x01, 0x00])  # an A-ASSOCIATE-RQ PDU header (256 bytes to follow)
NOT_ASCII_AE = HEADER + b"\x00\x01\x00\x00" + bytes([0xC3]) * 32 + bytes(222)  # AE titles: not ASCII


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    started: list[Listener] = []

    def _start(**listener: object) -> Listener:
        spool = Spool(tmp_path / "spool")
        spool.ensure()
        settings = ListenerSettings(host="127.0.0.1", port=free_port(), **listener)
        lst = Listener(settings, spool, Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}"))
        lst.start()
        started.append(lst)
        return lst

    yield _start
    for lst in started:
        lst.stop()


def _associate(port: int, source: str = PACS, tls: ssl.SSLContext | None = None) -> object:
    ae = AE(ae_title="GATESCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    return ae.associate("127.0.0.1", port, ae_title="DFUSION", bind_address=(source, 0),
                        tls_args=(tls, "localhost") if tls else None)


def _echo(port: int, source: str = PACS, tls: ssl.SSLContext | None = None) -> bool:
    assoc = _associate(port, source, tls)
    if not assoc.is_established:  # type: ignore[attr-defined]
        return False
    try:
        return bool(assoc.send_c_echo().Status == 0)  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]


def _connect(port: int, source: str = SCANNER, send: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    if send:
        s.sendall(send)
    return s


def _released(lst: Listener, peer: str = SCANNER, within: float = 1.0, seen: int = 0) -> bool:
    """The gate released `peer`'s connections within `within` seconds (its thread notes the close just
    after closing the socket), after having seen at least `seen` connections: a connection the client has
    already closed may still wait in the listen backlog, and is only counted once the accept loop takes it."""
    end = time.monotonic() + within
    while (lst.gate.seen < seen or lst.gate.open_connections(peer)) and time.monotonic() < end:
        time.sleep(0.01)
    return lst.gate.seen >= seen and lst.gate.open_connections(peer) == 0


def _seconds_until_closed(s: socket.socket, limit: float = 10) -> tuple[float, bytes]:
    """Seconds until the listener closes `s` (EOF or reset), and what it sent before."""
    t0 = time.monotonic()
    s.settimeout(limit)
    got = b""
    try:
        while chunk := s.recv(64):
            got += chunk
    except OSError:
        pass
    s.close()
    return time.monotonic() - t0, got


@pytest.mark.parametrize("junk", [b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00",
                                  bytes([0x04, 0, 0, 0, 0, 8]) + bytes(8),  # a P-DATA-TF first
                                  bytes([0x01, 0, 0, 0, 0, 4]) + bytes(4),  # a length too short for a request
                                  NOT_ASCII_AE])
def test_junk_is_closed_at_once(start, junk: bytes) -> None:
    lst = start(handshake_timeout=5.0)
    took, got = _seconds_until_closed(_connect(lst.settings.port, send=junk))
    assert took < 1.0 and got == b""
    assert _released(lst)


def test_a_closed_connection_frees_the_peer_at_once(start) -> None:
    lst = start(handshake_timeout=5.0, max_associations_per_peer=1)
    port = lst.settings.port
    for send in (b"", b"\x01\x00", HEADER + bytes(40)):  # connect-close, truncated header, truncated request
        assert _released(lst)  # the previous round's C-ECHO association has ended
        seen = lst.gate.seen
        _connect(port, send=send).close()
        assert _released(lst, seen=seen + 1), f"the peer's slot was not freed at once after {send!r}"
        assert _echo(port, SCANNER)


def test_silent_connection_closed_after_handshake_timeout_and_holds_no_slot(start) -> None:
    lst = start(handshake_timeout=0.5, max_associations=1)
    port = lst.settings.port
    silent = [_connect(port, send=HEADER), _connect(port, source="127.0.0.3")]
    time.sleep(0.1)
    assert _echo(port)  # max_associations = 1, and the two silent connections do not take it
    for s in silent:
        took, got = _seconds_until_closed(s)
        assert took < 1.5 and got == b""
    assert _released(lst)


def test_per_peer_limit(start) -> None:
    lst = start(max_associations_per_peer=2)
    port = lst.settings.port
    held = [_associate(port, SCANNER) for _ in range(2)]
    assert all(a.is_established for a in held)  # type: ignore[attr-defined]
    # Every one over the limit reads the rejection, never a reset: the RJ goes out once the request is in and
    # the socket closes after the peer (LingeringCloser; an RJ sent at accept, before the request, made
    # pynetdicom's requestor abort). Raw sockets, ten tries: pynetdicom's requestor itself may report a fast
    # RJ as an abort under load (it checks the socket after the DUL has already closed it on the RJ).
    for _ in range(10):
        with _connect(port, send=association_rq(calling="GATESCU")) as s:
            answer = b""
            while len(answer) < len(ASSOCIATE_RJ_LOCAL_LIMIT) and (chunk := s.recv(64)):
                answer += chunk
            assert answer == ASSOCIATE_RJ_LOCAL_LIMIT
    # the refusal is pynetdicom's own answer over max_associations: transient, local limit exceeded
    assert struct.unpack(">BBB", ASSOCIATE_RJ_LOCAL_LIMIT[7:]) == (0x02, 0x03, 0x02)
    assert _echo(port, PACS)  # other peers are served
    held[0].release()  # type: ignore[attr-defined]
    time.sleep(0.2)
    assert _echo(port, SCANNER)
    held[1].release()  # type: ignore[attr-defined]


def test_refusals_logged_once_a_minute_per_peer(start, caplog: pytest.LogCaptureFixture) -> None:
    lst = start(handshake_timeout=5.0)
    with caplog.at_level("WARNING", logger="dicom_fusion.service.ingest.connections"):
        for source in (SCANNER, "127.0.0.3"):
            for _ in range(5):
                _seconds_until_closed(_connect(lst.settings.port, source=source, send=b"SSH-2.0-x\r\n"))
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2 and SCANNER in lines[0] and "127.0.0.3" in lines[1], lines
    assert "SSH" not in "".join(lines)  # the reason, never the bytes


def test_tls_silent_peer_does_not_stall_the_accept_loop(start, tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    lst = start(handshake_timeout=1.0, tls=TLSSettings(cert_file=cert, key_file=key))
    port = lst.settings.port
    silent = _connect(port)  # no ClientHello
    time.sleep(0.1)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    t0 = time.monotonic()
    assert _echo(port, PACS, tls=ctx)
    assert time.monotonic() - t0 < 1.0
    took, _ = _seconds_until_closed(silent)
    assert took < 2.0
