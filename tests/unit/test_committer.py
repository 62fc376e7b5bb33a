"""The listener's group commit: batching, acknowledgement only after the commit, batch failures.

No timings are asserted: a gate blocks the committer inside its ledger transaction so that the test
decides which stores end up in the same batch.
"""
from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import write_instance
from sqlalchemy.exc import OperationalError

from dicom_fusion.service.ingest import committer as committer_mod
from dicom_fusion.service.ingest.committer import CommitError, GroupCommitter
from dicom_fusion.service.ingest.listener import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    StoreHandler,
    parse_header,
)
from dicom_fusion.service.storage import spool as spool_mod
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Instance, RecordOutcome
from dicom_fusion.service.storage.spool import Spool

STUDY = "1.2.826.0.1.3680043.8.498.7"
SERIES = STUDY + ".1"


@dataclass(frozen=True)
class Key:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.2"
    modality: str = "CT"
    transfer_syntax: str = "1.2.840.10008.1.2.1"


def key(i: int) -> Key:
    return Key(STUDY, SERIES, f"{SERIES}.{i}")


class Gate:
    """Blocks the first ``record_instances`` call until opened; later calls pass (or fail on demand)."""

    def __init__(self, ledger: Ledger) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.fail_next: Exception | None = None
        self.calls = 0
        self._real = ledger.record_instances
        ledger.record_instances = self  # type: ignore[method-assign]

    def __call__(self, records: list[object], **kwargs: object) -> list[RecordOutcome]:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.opened.wait(30), "test never opened the gate"
        elif self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return self._real(records, **kwargs)  # type: ignore[arg-type]


def wait_for(pred: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not pred():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


class Store(threading.Thread):
    """One association's handler thread: store and keep the outcome or the error."""

    def __init__(self, committer: GroupCommitter, k: Key, data: bytes) -> None:
        super().__init__(daemon=True)
        self.committer, self.key, self.data = committer, k, data
        self.outcome: RecordOutcome | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.outcome = self.committer.store(self.key, self.data, calling_ae="PACS")
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[Spool, Ledger]]:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    yield spool, ledger
    ledger.close()


@pytest.fixture
def committer(parts: tuple[Spool, Ledger]) -> Iterator[GroupCommitter]:
    spool, ledger = parts
    c = GroupCommitter(spool, ledger, max_batch=64)
    c.start()
    yield c
    c.stop()


def rows(ledger: Ledger) -> dict[str, Instance]:
    with ledger.session() as s:
        return {r.sop_uid: r for r in s.query(Instance)}


def temp_files(spool: Spool) -> list[Path]:
    return [p for p in spool.studies_dir.rglob(".tmp-*")]


def test_concurrent_stores_share_one_batch_and_are_acknowledged_only_after_its_commit(
        parts: tuple[Spool, Ledger], committer: GroupCommitter) -> None:
    spool, ledger = parts
    gate = Gate(ledger)
    first = Store(committer, key(1), b"first")
    first.start()
    assert gate.entered.wait(30)  # batch 1 (one instance) is inside its ledger transaction
    others = [Store(committer, key(i), f"data-{i}".encode()) for i in range(2, 6)]
    for t in others:
        t.start()
    wait_for(lambda: committer.pending == 4, "the other stores to queue behind the running batch")
    # Nobody is acknowledged while the commit is open, and nothing is in the ledger yet.
    assert all(t.is_alive() for t in [first, *others])
    assert rows(ledger) == {}
    gate.opened.set()
    for t in [first, *others]:
        t.join(30)
        assert t.error is None and t.outcome is not None and t.outcome.new
    assert committer.stats.sizes == [1, 4]  # the four waiters shared one sync and one transaction
    stored = rows(ledger)
    assert sorted(stored) == sorted(k.sop_uid for k in map(key, range(1, 6)))
    for i in range(2, 6):
        assert Path(stored[key(i).sop_uid].path).read_bytes() == f"data-{i}".encode()
    assert temp_files(spool) == []


def test_a_failed_batch_fails_every_waiter_and_the_committer_goes_on(
        parts: tuple[Spool, Ledger], committer: GroupCommitter) -> None:
    spool, ledger = parts
    gate = Gate(ledger)
    gate.fail_next = OperationalError("INSERT", {}, Exception("database is locked"))
    first = Store(committer, key(1), b"first")
    first.start()
    assert gate.entered.wait(30)
    doomed = [Store(committer, key(i), b"x" * i) for i in range(2, 5)]
    for t in doomed:
        t.start()
    wait_for(lambda: committer.pending == 3, "three stores queued")
    gate.opened.set()
    for t in [first, *doomed]:
        t.join(30)
    assert first.error is None
    for t in doomed:
        assert isinstance(t.error, CommitError) and "database is locked" in str(t.error)
    assert set(rows(ledger)) == {key(1).sop_uid}
    assert committer.stats.failed_batches == 1
    assert temp_files(spool) == []
    # The next batch commits normally; a resend of a failed instance is stored.
    assert committer.store(key(2), b"xx", calling_ae="PACS").new
    assert set(rows(ledger)) == {key(1).sop_uid, key(2).sop_uid}


def test_failed_batch_answers_out_of_resources_to_every_association(
        parts: tuple[Spool, Ledger], committer: GroupCommitter, tmp_path: Path) -> None:
    spool, ledger = parts
    handler = StoreHandler(spool, committer)
    gate = Gate(ledger)
    gate.fail_next = OperationalError("INSERT", {}, Exception("disk I/O error"))

    class Event:
        """What the handler reads of a pynetdicom C-STORE event: the request's UIDs and data set (without
        the file meta, as it came over the wire) and the context's transfer syntax."""

        def __init__(self, data: bytes) -> None:
            meta_end = 144 + struct.unpack("<I", data[140:144])[0]  # after the meta group (its length at 140)
            header = parse_header(data)
            self.assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="PACS"))
            self.request = SimpleNamespace(AffectedSOPInstanceUID=header.sop_uid,
                                           AffectedSOPClassUID=header.sop_class_uid,
                                           DataSet=BytesIO(data[meta_end:]))
            self.context = SimpleNamespace(transfer_syntax=header.transfer_syntax)

    def data(i: int) -> bytes:
        return write_instance(tmp_path / f"{i}.dcm", study_uid=STUDY, series_uid=SERIES,
                              sop_uid=f"{SERIES}.{i}").read_bytes()

    statuses: dict[int, int] = {}

    def call(i: int) -> None:
        statuses[i] = handler(Event(data(i)))  # type: ignore[arg-type]

    first = threading.Thread(target=call, args=(1,))
    first.start()
    assert gate.entered.wait(30)
    threads = [threading.Thread(target=call, args=(i,)) for i in (2, 3, 4)]
    for t in threads:
        t.start()
    wait_for(lambda: committer.pending == 3, "three associations waiting")
    gate.opened.set()
    for t in [first, *threads]:
        t.join(30)
    assert statuses == {1: STATUS_SUCCESS, 2: STATUS_OUT_OF_RESOURCES, 3: STATUS_OUT_OF_RESOURCES,
                        4: STATUS_OUT_OF_RESOURCES}
    assert set(rows(ledger)) == {f"{SERIES}.1"}


def test_many_associations_lose_no_row(parts: tuple[Spool, Ledger], committer: GroupCommitter) -> None:
    spool, ledger = parts
    threads: list[Store] = []
    for a in range(8):
        for i in range(25):
            n = a * 100 + i
            threads.append(Store(committer, Key(f"{STUDY}.{a}", f"{SERIES}.{a}", f"{SERIES}.{a}.{i}"),
                                 f"payload-{n}".encode()))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert t.error is None and t.outcome is not None and t.outcome.new
    stored = rows(ledger)
    assert len(stored) == len(threads)
    for t in threads:
        assert Path(stored[t.key.sop_uid].path).read_bytes() == t.data
    assert committer.stats.instances == len(threads)
    assert temp_files(spool) == []


def test_duplicates_keep_the_first_copy(parts: tuple[Spool, Ledger], committer: GroupCommitter) -> None:
    spool, ledger = parts
    assert committer.store(key(1), b"original", calling_ae="PACS").new
    gate = Gate(ledger)
    blocker = Store(committer, key(9), b"blocker")
    blocker.start()
    assert gate.entered.wait(30)
    same_batch = [Store(committer, key(2), b"a"), Store(committer, key(2), b"b"),
                  Store(committer, key(1), b"changed")]
    for t in same_batch:
        t.start()
        wait_for(lambda t=t: committer.pending == same_batch.index(t) + 1, "queued in order")
    gate.opened.set()
    for t in [blocker, *same_batch]:
        t.join(30)
        assert t.error is None
    assert [t.outcome.new for t in same_batch if t.outcome] == [True, False, False]
    stored = rows(ledger)
    assert Path(stored[key(1).sop_uid].path).read_bytes() == b"original"
    assert Path(stored[key(2).sop_uid].path).read_bytes() == b"a"
    assert temp_files(spool) == []
    assert len(list((spool.studies_dir / STUDY / SERIES).glob(f"{key(1).sop_uid}.*"))) == 1


@pytest.mark.parametrize("mode", ["file", "filesystem"])
def test_sync_modes(parts: tuple[Spool, Ledger], monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    spool, ledger = parts
    calls: list[str] = []
    monkeypatch.setattr(spool_mod.os, "fdatasync", lambda fd: calls.append("fdatasync"))
    monkeypatch.setattr(committer_mod, "sync_filesystem", lambda path: calls.append("syncfs"))
    monkeypatch.setattr(committer_mod, "fsync_dirs", lambda dirs: calls.append(f"dirs:{len(set(dirs))}"))
    c = GroupCommitter(spool, ledger, sync_mode=mode)  # type: ignore[arg-type]
    c.start()
    try:
        assert c.store(key(1), b"one", calling_ae="PACS").new
    finally:
        c.stop()
    expected = ["fdatasync", "dirs:1"] if mode == "file" else ["syncfs", "dirs:1"]
    assert calls == expected


def test_store_after_stop_is_refused_and_leaves_nothing(parts: tuple[Spool, Ledger]) -> None:
    spool, ledger = parts
    c = GroupCommitter(spool, ledger)
    c.start()
    c.stop()
    with pytest.raises(CommitError, match="not running"):
        c.store(key(1), b"late", calling_ae="PACS")
    assert rows(ledger) == {}
    assert temp_files(spool) == []
