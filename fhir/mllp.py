"""MLLP client: send one HL7 v2 message to a RIS and wait for its ACK, with timeouts and retries.

MLLP (HL7 v2 Appendix C) frames a message as <VT> message <FS><CR> over TCP; the receiver answers one
framed ACK on the same connection. One connection per message keeps the client stateless (no half-open
sockets kept across jobs). Logs carry the host, port, control ID and ACK code only: the message and the
RIS's answer can hold patient data.
"""
from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from dicom_fusion.fhir.hl7v2 import Ack, Hl7Error, Hl7Unavailable, check_ack, parse_ack

log = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"
_MAX_ACK_BYTES = 1 << 20


@dataclass(frozen=True)
class MllpTarget:
    """Where the RIS listens, how long to wait for an ACK, and how often to try again on retryable errors."""

    host: str
    port: int
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 1.0

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("MllpTarget.host is empty; set hl7.host")
        if not 0 < self.port < 65536:
            raise ValueError(f"MllpTarget.port must be 1..65535, got {self.port}; set hl7.port")
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0:
            raise ValueError("MllpTarget needs timeout > 0, retries >= 0 and backoff >= 0")

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def frame(message: str) -> bytes:
    """Wrap a message (segments separated by CR) in an MLLP block."""
    return START_BLOCK + message.encode("utf-8") + END_BLOCK


def exchange(data: bytes, target: MllpTarget) -> bytes:
    """Send one framed block and return the framed answer (without framing); raise `Hl7Unavailable`."""
    deadline = time.monotonic() + target.timeout
    try:
        with socket.create_connection((target.host, target.port), timeout=target.timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(data)
            buf = bytearray()
            while END_BLOCK not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    raise Hl7Unavailable(f"the RIS at {target} closed the connection without an ACK; "
                                         "check hl7.host/hl7.port point at its MLLP listener")
                buf += chunk
                if len(buf) > _MAX_ACK_BYTES:
                    raise Hl7Unavailable(f"the RIS at {target} sent more than 1 MiB without an MLLP end block; "
                                         "it does not speak MLLP")
    except TimeoutError as exc:
        raise Hl7Unavailable(f"no ACK from the RIS at {target} within {target.timeout:g} s; "
                             "raise hl7.timeout if it is slow") from exc
    except OSError as exc:
        raise Hl7Unavailable(f"cannot reach the RIS at {target} ({type(exc).__name__}: {exc}); check hl7.host, "
                             "hl7.port and that its MLLP listener is running") from exc
    block = bytes(buf[:buf.index(END_BLOCK)])
    return block[block.index(START_BLOCK) + 1:] if START_BLOCK in block else block


def send_message(message: str, control_id: str, target: MllpTarget, *, redact: tuple[str, ...] = (),
                 sleep: Callable[[float], None] = time.sleep) -> Ack:
    """Send `message` and return the accepting ACK; retries retryable failures `target.retries` times.

    Raises `Hl7Rejected` (AR/CR) at once, and the last retryable `Hl7Error` (`Hl7Unavailable`,
    `Hl7ApplicationError`) when the retries are spent. `redact` values are masked in error texts.
    """
    data = frame(message)
    attempt = 0
    while True:
        try:
            ack = parse_ack(exchange(data, target), expected_control_id=control_id)
            check_ack(ack, redact=redact)
        except Hl7Error as exc:
            if not exc.retryable or attempt >= target.retries:
                log.warning("HL7 %s to %s failed after %d attempt(s): %s", control_id, target, attempt + 1,
                            type(exc).__name__)
                raise
            delay = target.backoff * (2 ** attempt)
            log.warning("HL7 %s to %s: %s, attempt %d/%d; retrying in %.1f s", control_id, target,
                        type(exc).__name__, attempt + 1, target.retries + 1, delay)
            sleep(delay)
            attempt += 1
            continue
        log.info("HL7 %s delivered to %s (%s)", control_id, target, ack.code)
        return ack
