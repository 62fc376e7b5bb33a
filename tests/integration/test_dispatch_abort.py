"""A PACS that hangs after accepting the association: once the stage's soft time limit interrupts the
C-STORE, delivery must end at once (A-ABORT), not wait out `pacs.timeout` again for a release the hung
peer never answers.

Celery's soft time limit is a signal whose handler raises `SoftTimeLimitExceeded` in the task's thread;
SIGALRM with a handler that raises does the same here, in the same place (the wait for the C-STORE
response).
"""
from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.outputs.dispatch import DicomNode, echo, store_to_pacs

PACS_TIMEOUT = 20.0  # what pacs.timeout would be; the test fails if delivery waits anything like it
SOFT_LIMIT = 1.0


class SoftLimit(Exception):
    """Stands for celery.exceptions.SoftTimeLimitExceeded."""


@pytest.fixture
def hung_pacs() -> Iterator[tuple[DicomNode, list[str]]]:
    """Accepts associations, then never answers a C-STORE or a C-ECHO; records the association's end."""
    release = threading.Event()
    ended: list[str] = []

    def hang(event: evt.Event) -> int:
        release.wait(60)
        return 0x0000

    ae = AE(ae_title="HUNGPACS")
    ae.add_supported_context(CTImageStorage)
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, hang), (evt.EVT_C_ECHO, hang),
        (evt.EVT_ABORTED, lambda e: ended.append("aborted")), (evt.EVT_RELEASED, lambda e: ended.append("released")),
        (evt.EVT_CONN_CLOSE, lambda e: ended.append("closed"))])
    try:
        yield DicomNode("HUNGPACS", "127.0.0.1", port), ended
    finally:
        release.set()
        server.shutdown()


@pytest.fixture
def soft_limit() -> Iterator[None]:
    def fire(signum: int, frame: FrameType | None) -> None:
        raise SoftLimit("soft time limit")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, SOFT_LIMIT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_store_interrupted_by_the_soft_limit_aborts_at_once(hung_pacs: tuple[DicomNode, list[str]],
                                                            soft_limit: None) -> None:
    node, ended = hung_pacs
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    started = time.monotonic()
    with pytest.raises(SoftLimit):
        store_to_pacs([ds], node, calling_ae="DFUSION", timeout=PACS_TIMEOUT)
    elapsed = time.monotonic() - started
    print(f"\nsoft limit at {SOFT_LIMIT:g} s, store_to_pacs returned after {elapsed:.2f} s "
          f"(pacs.timeout {PACS_TIMEOUT:g} s)")
    assert elapsed < SOFT_LIMIT + 2.0, elapsed  # a graceful release would wait ~PACS_TIMEOUT more
    deadline = time.monotonic() + 5
    while "closed" not in ended and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "closed" in ended and "released" not in ended, ended  # the peer saw an abort, not a release


def test_echo_interrupted_by_the_soft_limit_aborts_at_once(hung_pacs: tuple[DicomNode, list[str]],
                                                           soft_limit: None) -> None:
    node, _ = hung_pacs
    started = time.monotonic()
    with pytest.raises(SoftLimit):
        echo(node, "DFUSION", timeout=PACS_TIMEOUT)
    assert time.monotonic() - started < SOFT_LIMIT + 2.0
