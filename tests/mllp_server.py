"""A small real MLLP listener for tests: a RIS stand-in on a free loopback port.

It parses every received message with the `hl7` package, keeps it, and answers an original-mode ACK
whose MSA-1 comes from `answers` (one per message, then `default`): "AA", "AE", "AR", or "SILENT"
(answer nothing: the sender must time out) or "CLOSE" (drop the connection).
"""
from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import hl7

START, END = b"\x0b", b"\x1c\r"


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.request.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while END in buf:
                block, buf = buf.split(END, 1)
                text = block[block.index(START) + 1:].decode("utf-8") if START in block else block.decode()
                answer = self.server.owner.record(text)
                if answer == "SILENT":
                    self.server.owner.release.wait(30)
                    return
                if answer == "CLOSE":
                    return
                self.request.sendall(START + _ack(text, answer).encode() + END)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    owner: MllpServer


def _ack(message: str, code: str) -> str:
    msg = hl7.parse(message)
    control_id = str(msg["MSH.F10"])
    text = {"AA": "", "AE": "database busy", "AR": "receiving application not configured"}.get(code, "")
    return "\r".join([f"MSH|^~\\&|RIS|HOSPITAL|{msg['MSH.F3']}|{msg['MSH.F4']}|20250101000000||ACK^R01^ACK|"
                      f"ACK{control_id[-10:]}|P|2.5.1", f"MSA|{code}|{control_id}|{text}"]) + "\r"


class MllpServer:
    def __init__(self, answers: list[str] | None = None, default: str = "AA") -> None:
        self.answers = list(answers or [])
        self.default = default
        self.received: list[hl7.Message] = []
        self.raw: list[str] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def record(self, text: str) -> str:
        parsed = hl7.parse(text)  # a message the `hl7` package cannot parse fails the test here
        with self._lock:
            self.raw.append(text)
            self.received.append(parsed)
            return self.answers.pop(0) if self.answers else self.default

    def start(self) -> MllpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextmanager
def running(answers: list[str] | None = None, default: str = "AA") -> Iterator[MllpServer]:
    server = MllpServer(answers, default).start()
    try:
        yield server
    finally:
        server.stop()
