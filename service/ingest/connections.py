"""Connection hygiene: what a TCP connection must show before pynetdicom makes an association of it.

A port scanner (connect and close, junk bytes, a truncated A-ASSOCIATE-RQ, a PDU header then silence)
must not take the listener's association slots. pynetdicom starts an acceptor thread per connection,
counts it against ``maximum_associations`` and waits up to ``acse_timeout`` for the A-ASSOCIATE-RQ, even
when the peer has already gone (docs/architecture.md, "Pitfalls met"). So a connection passes
this gate first, in its own thread, before any :class:`~pynetdicom.association.Association` exists:

==============================================  =================================================
the peer ...                                    the gate
==============================================  =================================================
has ``max_associations_per_peer`` connections   takes no slot; answers A-ASSOCIATE-RJ (transient,
open already (pending or associated)            local limit exceeded) once its request is in, closes
                                                when the peer has read it (`LingeringCloser`, <= 1 s)
closes before sending a whole request           closes at once (a TCP probe: not logged)
sends something that is not an A-ASSOCIATE-RQ   closes at once
(another PDU type, a bad length, undecodable)
sends no whole request in ``handshake_timeout``  closes after ``handshake_timeout``
sends a whole A-ASSOCIATE-RQ in time            hands the socket to pynetdicom, which reads it
==============================================  =================================================

The gate only *peeks* at the socket (``MSG_PEEK``, with ``SO_RCVLOWAT`` so that it sleeps until the
bytes it needs are there): pynetdicom then reads the request itself. Over TLS the gate runs the TLS
handshake (out of the accept loop, bounded by ``handshake_timeout``) and cannot peek; the association
then waits for its request at most what is left of ``handshake_timeout``.

Every refusal is logged, once a minute per peer address at most, with the peer address and the
reason only (never the bytes received).
"""
from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_fusion.service.config import ListenerSettings

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: result 2 (rejected-transient), source 3 (service-provider, presentation related),
# reason 2 (local-limit-exceeded): what pynetdicom itself answers over `maximum_associations`.
ASSOCIATE_RJ_LOCAL_LIMIT = bytes([0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x02, 0x03, 0x02])
_PDU_HEADER = 6
_RQ_MIN_LENGTH = 68  # the fixed fields of an A-ASSOCIATE-RQ (PS3.8 9.3.2)
_AE_TITLES = slice(10, 42)  # called and calling AE title in the PDU
MAX_RQ_LENGTH = 1 << 20  # a request proposing every storage class in many transfer syntaxes is ~100 KiB
MAX_PENDING = 256  # connections in the gate at once, all peers together; more are closed at once
_POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)
LINGER_SECONDS = 2.0  # how long a refused connection is waited for (its request, then its close) at most
REQUEST_WAIT_SECONDS = 0.25  # once the first bytes of the request are in, for the rest of it
MAX_LINGERING = 64  # refused connections lingering at once; beyond, they are closed at once (a flood)
_CLOSED_QUIETLY = "closed before sending anything"


class RefusalLog:
    """Logs a peer's refused connections once per `interval` seconds at most: the first one at once,
    the next line (with how many were refused meanwhile) at the first refusal a minute later."""

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.interval = interval
        self._clock = clock
        self._log = logger
        self._lock = threading.Lock()
        self._peers: dict[str, list[float | int]] = {}  # peer -> [time of its last line, refused since]

    def refused(self, peer: str, reason: str) -> None:
        now = self._clock()
        with self._lock:
            entry = self._peers.get(peer)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return
            since = int(entry[1]) if entry is not None else 0
            self._peers[peer] = [now, 0]
            if len(self._peers) > 4096:  # many scanning addresses: forget the quiet ones
                self._peers = {p: e for p, e in self._peers.items() if now - e[0] < self.interval}
        more = (f" ({since} more refused in the last minute)" if since
                else "; further refusals from this address are logged once a minute")
        self._log.warning("connection from %s refused: %s%s", peer, reason, more)


class ConnectionGate:
    """Per-peer connection counts, the pre-association checks and the refusal log of one listener
    process (each process of ``listener.processes`` keeps its own)."""

    def __init__(self, settings: ListenerSettings, refusals: RefusalLog | None = None) -> None:
        self.handshake_timeout = settings.handshake_timeout
        self.acse_timeout = settings.acse_timeout
        self.per_peer_limit = settings.max_associations_per_peer
        self.refusals = refusals or RefusalLog()
        self._lock = threading.Lock()
        self._per_peer: dict[str, int] = {}
        self._pending = 0
        self.seen = 0  # connections the accept loop has handed to the gate so far (admitted or refused)

    # ---- counts (the accept loop admits, the connection's thread releases) ----------------------
    # A connection `admit` refused is closed by `LingeringCloser` (the server's shutdown_request), not here.

    def admit(self, sock: socket.socket, peer: str, *, tls: bool) -> bool:
        """Called in the accept loop: take a connection slot of `peer`, or refuse at once."""
        with self._lock:
            self.seen += 1
            if self._per_peer.get(peer, 0) >= self.per_peer_limit:
                reason = f"{self.per_peer_limit} connections from this address already open " \
                         "(listener.max_associations_per_peer)"
            elif self._pending >= MAX_PENDING:
                reason = f"{MAX_PENDING} connections are already negotiating"
            else:
                self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
                self._pending += 1
                return True
        # The A-ASSOCIATE-RJ is sent by the server's LingeringCloser once the request is in (not over TLS:
        # the peer could not read a plain PDU there).
        self.refusals.refused(peer, reason)
        return False

    def negotiated(self) -> None:
        """The connection left the gate (handed to pynetdicom or closed)."""
        with self._lock:
            self._pending -= 1

    def release(self, peer: str) -> None:
        """The connection of `peer` is closed (refused by the gate, or its association ended)."""
        with self._lock:
            left = self._per_peer.get(peer, 0) - 1
            if left > 0:
                self._per_peer[peer] = left
            else:
                self._per_peer.pop(peer, None)

    def open_connections(self, peer: str) -> int:
        with self._lock:
            return self._per_peer.get(peer, 0)

    # ---- the checks ------------------------------------------------------------------------------

    def check(self, sock: socket.socket, peer: str,
              ssl_context: ssl.SSLContext | None) -> tuple[socket.socket, float] | None:
        """Wait (at most ``handshake_timeout``) for a whole A-ASSOCIATE-RQ on `sock`; over TLS for the
        TLS handshake. Returns the socket to associate on and the seconds left, or None when refused
        (the socket is then closed)."""
        deadline = time.monotonic() + self.handshake_timeout
        if ssl_context is not None:
            problem, sock = _tls_handshake(sock, ssl_context, deadline)
        else:
            problem = await_associate_rq(sock, deadline)
        if problem is None:
            sock.settimeout(None)  # what pynetdicom expects of an accepted socket: blocking
            return sock, max(deadline - time.monotonic(), 0.0)
        _close(sock)
        if problem == _CLOSED_QUIETLY:
            log.debug("connection from %s closed before sending anything", peer)
        else:
            self.refusals.refused(peer, problem)
        return None


def await_associate_rq(sock: socket.socket, deadline: float) -> str | None:
    """Peek at `sock` until a whole, decodable A-ASSOCIATE-RQ PDU is buffered (None) or the peer
    shows it will not send one (the reason). Nothing is consumed from the socket."""
    need = 1
    length = 0
    poller = select.poll()
    poller.register(sock, select.POLLIN | _POLLRDHUP)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "no whole A-ASSOCIATE-RQ within listener.handshake_timeout"
            # poll wakes when `need` bytes are in (or the peer closed)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
            events = poller.poll(remaining * 1000)
            if not events:
                continue
            try:
                data = sock.recv(need, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                data, closed = b"", False
            except OSError:
                return "connection reset before a whole A-ASSOCIATE-RQ"
            else:
                closed = bool(events[0][1] & (_POLLRDHUP | select.POLLHUP | select.POLLERR))
            if not data and closed:
                return _CLOSED_QUIETLY
            if data and data[0] != 0x01:
                return f"not an A-ASSOCIATE-RQ (first byte 0x{data[0]:02X})"
            if len(data) >= _PDU_HEADER and not length:
                length = struct.unpack(">L", data[2:6])[0]
                if not _RQ_MIN_LENGTH <= length <= MAX_RQ_LENGTH:
                    return f"not an A-ASSOCIATE-RQ (PDU length {length})"
            if len(data) >= _AE_TITLES.stop and any(b >= 0x7F or 0 < b < 0x20 for b in data[_AE_TITLES]):
                return "not an A-ASSOCIATE-RQ (AE titles not ASCII)"  # pynetdicom would log a traceback
            if len(data) < need:
                if closed:
                    return f"closed after {len(data)} bytes, before a whole A-ASSOCIATE-RQ"
                time.sleep(0.01)  # the kernel caps SO_RCVLOWAT: look again shortly
                continue
            if need < _PDU_HEADER:
                need = _PDU_HEADER
            elif need == _PDU_HEADER:
                need = _PDU_HEADER + length
            else:
                return _decode_problem(data)
    finally:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError:
            pass


def _decode_problem(data: bytes) -> str | None:
    try:
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(data)
        if pdu.application_context_name is None or not pdu.presentation_context:
            return "not an A-ASSOCIATE-RQ (no application context or no presentation context)"
    except Exception as exc:  # pynetdicom raises many types on malformed PDUs
        return f"not an A-ASSOCIATE-RQ (cannot decode: {type(exc).__name__})"
    return None


def _tls_handshake(sock: socket.socket, ctx: ssl.SSLContext,
                   deadline: float) -> tuple[str | None, socket.socket]:
    try:
        tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except (OSError, ValueError) as exc:
        return f"TLS set-up failed ({type(exc).__name__})", sock
    try:
        tls.settimeout(max(deadline - time.monotonic(), 0.01))
        tls.do_handshake()
    except TimeoutError:
        return "no TLS handshake within listener.handshake_timeout", tls
    except (OSError, ValueError) as exc:
        return f"TLS handshake failed ({type(exc).__name__})", tls
    return None, tls


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class LingeringCloser:
    """Refuses a connection the gate did not admit so that the peer reads "rejected, transient, local limit
    exceeded" (which a PACS retries later) and not an abort.

    Two races turn a refusal into an abort on the peer's side: an A-ASSOCIATE-RJ that arrives before the
    peer has sent its request is an unexpected PDU there (pynetdicom's requestor aborts), and a close
    with unread bytes in the socket (the request) makes the kernel answer with RST, which can drop the
    RJ before the peer reads it. So, in a short-lived thread (never in the accept loop), the closer reads
    the peer's request (one whole PDU: its first bytes within ``LINGER_SECONDS``, a loaded peer may take a
    while to send it; the rest within ``REQUEST_WAIT_SECONDS`` of them), answers the RJ, then reads and
    drops whatever comes until the peer closes, and only then closes, at most ``LINGER_SECONDS`` (and half
    a second past the RJ) in all. Under a flood, at most
    ``MAX_LINGERING`` connections linger at once; the rest get the RJ and are closed at once.
    """

    def __init__(self, seconds: float = LINGER_SECONDS, limit: int = MAX_LINGERING) -> None:
        self.seconds = seconds
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    def close(self, sock: socket.socket, *, reply: bytes | None) -> None:
        """Refuse `sock`, answering `reply` (None over TLS) once the peer's request is in."""
        with self._lock:
            linger = self.active < self.limit
            if linger:
                self.active += 1
        if not linger:
            if reply is not None:
                try:
                    sock.setblocking(False)
                    sock.send(reply)
                except OSError:
                    pass
            _close(sock)
            return
        threading.Thread(target=self._linger, args=(sock, reply), name="refused-linger", daemon=True).start()

    def _linger(self, sock: socket.socket, reply: bytes | None) -> None:
        deadline = time.monotonic() + self.seconds
        try:
            if reply is not None:
                # a peer that sends no whole request in time is answered all the same
                with contextlib.suppress(TimeoutError):
                    _read_pdu(sock, deadline, rest=REQUEST_WAIT_SECONDS)
                deadline = max(deadline, time.monotonic() + 0.5)  # time for the peer to read the RJ and close
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                sock.sendall(reply)
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not sock.recv(65536):
                    break
        except OSError:  # reset, timeout: nothing more to do for this peer
            pass
        finally:
            sock.close()
            with self._lock:
                self.active -= 1


def _read_pdu(sock: socket.socket, deadline: float, *, rest: float) -> None:
    """Read and drop one PDU (6-byte header, then its length): the first bytes before `deadline`, the rest
    within `rest` seconds of them; stops at EOF. Raises TimeoutError when a deadline passes."""
    need, got, header = _PDU_HEADER, 0, b""
    while got < need:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(min(65536, need - got))
        if not chunk:
            return
        if not got:
            deadline = min(deadline, time.monotonic() + rest)
        if len(header) < _PDU_HEADER:
            header += chunk[:_PDU_HEADER - len(header)]
            if len(header) == _PDU_HEADER:
                need = _PDU_HEADER + min(struct.unpack(">I", header[2:6])[0], MAX_RQ_LENGTH)
        got += len(chunk)


class GatedRequestHandler(RequestHandler):
    """pynetdicom's request handler, run behind the :class:`ConnectionGate`: the association is
    created only for a connection that passed it, and this thread stays with it until it ends (so
    the peer's connection slot is released then)."""

    server: GatedAssociationServer

    def handle(self) -> None:
        gate = self.server.gate
        peer = str(self.client_address[0])
        try:
            checked = gate.check(self.request, peer, self.server.ssl_context)
        finally:
            gate.negotiated()
        if checked is None:
            return
        self.request, left = checked
        assoc = self._create_association()
        if self.server.ssl_context is not None:  # not peeked: wait for the request only what is left
            assoc.acse_timeout = min(max(left, 0.1), gate.acse_timeout)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()

    def finish(self) -> None:
        self.server.gate.release(str(self.client_address[0]))


class GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the :class:`ConnectionGate` in front: the accept loop only
    accepts and counts; TLS and the request checks run in the connection's own thread."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog: socketserver's 5 makes a burst's later connections wait 1 s+

    def __init__(self, *args: Any, gate: ConnectionGate, **kwargs: Any) -> None:
        self.gate = gate
        self.closer = LingeringCloser()
        self._refused: set[Any] = set()  # sockets verify_request refused, until shutdown_request takes them
        kwargs.setdefault("request_handler", GatedRequestHandler)
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        return self.socket.accept()  # not wrapped here: a silent TLS peer must not stall the loop

    def verify_request(self, request: Any, client_address: Any) -> bool:
        admitted = self.gate.admit(request, str(client_address[0]), tls=self.ssl_context is not None)
        if not admitted:
            self._refused.add(request)
        return admitted

    def shutdown_request(self, request: Any) -> None:
        """A refused connection lingers until the peer has read its A-ASSOCIATE-RJ (`LingeringCloser`);
        every other one closes as socketserver closes it."""
        if request in self._refused:
            self._refused.discard(request)
            plain = self.ssl_context is None  # over TLS the peer could not read a plain PDU
            self.closer.close(request, reply=ASSOCIATE_RJ_LOCAL_LIMIT if plain else None)
            return
        super().shutdown_request(request)
