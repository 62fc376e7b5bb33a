"""Group commit: concurrent C-STOREs share one sync and one ledger transaction.

pynetdicom runs one thread per association. Each store handler *stages* its instance (temp file
written beside its final name; in ``file`` sync mode also fdatasync'ed, in the handler's own thread so
that associations sync concurrently), hands it to the committer and waits. The committer thread takes
everything that is waiting (at most ``max_batch``; nothing is held back for company unless
``max_delay`` is set, so a lone association is never slowed) and, for the whole batch:

1. opens one ledger transaction (SQLite: BEGIN IMMEDIATE) and asks which SOP Instance UIDs the ledger
   already holds: duplicates drop their temp file and are answered success, the first copy is kept;
2. ``filesystem`` sync mode: one ``syncfs`` makes the data of every staged file durable;
3. links each staged file to its final name and fsyncs each directory the batch touched, once;
4. writes every row and commits (SQLite: one commit, one WAL fsync);
5. wakes every waiter, which only then answers 0x0000.

So the durability contract is unchanged — an instance is acknowledged only after its bytes, its name
and its ledger row are durable, in that order — while the syncs are paid per batch, not per instance.
Any error in steps 1-4 fails every waiter of that batch (the listener answers 0xA700) and the committer
goes on with the next batch. A file published before the error has no ledger row: it is never read
(workers read paths from the ledger) and a resend of the same bytes reuses its name.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from dicom_fusion.service.errors import SpoolError
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import FilingHeader, InstanceRecord, RecordOutcome
from dicom_fusion.service.storage.spool import Spool, StagedFile, fsync_dirs, sync_filesystem

log = logging.getLogger(__name__)

SyncMode = Literal["file", "filesystem"]


class CommitError(SpoolError):
    """The batch an instance was in could not be made durable (→ 0xA700); the message says why."""


@dataclass
class _Pending:
    record: InstanceRecord
    staged: StagedFile
    done: threading.Event = field(default_factory=threading.Event)
    outcome: RecordOutcome | None = None
    error: BaseException | None = None

    def resolve(self, outcome: RecordOutcome | None = None, error: BaseException | None = None) -> None:
        self.outcome, self.error = outcome, error
        self.done.set()


@dataclass
class CommitStats:
    """Counters for benchmarks and tests (batches committed, instances in them, largest batch)."""

    batches: int = 0
    instances: int = 0
    largest: int = 0
    failed_batches: int = 0
    sizes: list[int] = field(default_factory=list)  # the last 1000 batch sizes

    def add(self, n: int) -> None:
        self.batches += 1
        self.instances += n
        self.largest = max(self.largest, n)
        self.sizes.append(n)
        del self.sizes[:-1000]


_STOP = object()


class GroupCommitter:
    """One committer thread per listener process; see the module docstring for the protocol."""

    def __init__(self, spool: Spool, ledger: Ledger, *, sync_mode: SyncMode = "file", max_batch: int = 64,
                 max_delay: float = 0.0, wait_timeout: float = 120.0) -> None:
        if sync_mode not in ("file", "filesystem"):
            raise ValueError(f"sync_mode must be 'file' or 'filesystem', not {sync_mode!r}")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.spool = spool
        self.ledger = ledger
        self.sync_mode: SyncMode = sync_mode
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.wait_timeout = wait_timeout
        self.stats = CommitStats()
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._lock = threading.Lock()

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._accepting = True
            self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Commit what is waiting, then stop; later submissions fail (→ 0xA700)."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._accepting = False
            if thread is not None:
                self._queue.put(_STOP)  # under the lock: every accepted item is queued before it
        if thread is not None:
            thread.join()

    @property
    def pending(self) -> int:
        """Instances handed over and not yet taken into a batch."""
        return self._queue.qsize()

    # ---- handler side -------------------------------------------------------------------------
    def store(self, key: FilingHeader, data: bytes, *, calling_ae: str) -> RecordOutcome:
        """Stage ``data`` and block until its batch is durable.

        Returns the ledger outcome (``new=False`` for a duplicate). Raises :class:`SpoolError` when
        the bytes cannot be written, or :class:`CommitError` when the batch failed; both mean 0xA700.
        """
        staged = self.spool.stage(key.study_uid, key.series_uid, key.sop_uid, data,
                                  sync_data=self.sync_mode == "file")
        return self.wait(self.submit(key, staged, calling_ae=calling_ae))

    def submit(self, key: FilingHeader, staged: StagedFile, *, calling_ae: str) -> _Pending:
        """Hand over a file already staged (its data fdatasync'ed in ``file`` sync mode) without waiting:
        STOW-RS (:mod:`.stow`) submits every part of a request, then :meth:`wait` for each. Raises
        :class:`CommitError` (the staged file discarded) when the committer is not running."""
        record = InstanceRecord.of(key, path=staged.final, sha256=staged.sha256, size=staged.size,
                                   calling_ae=calling_ae)
        item = _Pending(record=record, staged=staged)
        with self._lock:
            accepted = self._accepting
            if accepted:
                self._queue.put(item)
        if not accepted:
            self.spool.discard(staged)
            raise CommitError("the committer is not running (shutting down); send again")
        return item

    def wait(self, item: _Pending) -> RecordOutcome:
        """Block until ``item``'s batch is durable; its outcome, or :class:`CommitError` (→ 0xA700)."""
        if not item.done.wait(self.wait_timeout):
            # The row may still land later; the sender then resends and gets a duplicate's success.
            raise CommitError(f"no durable commit within {self.wait_timeout:.0f} s (disk or ledger stalled)")
        if item.error is not None:
            raise CommitError(f"batch commit failed: {type(item.error).__name__}: {item.error}") from item.error
        assert item.outcome is not None
        return item.outcome

    # ---- committer thread ---------------------------------------------------------------------
    def _take_batch(self) -> tuple[list[_Pending], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch: list[_Pending] = [first]  # type: ignore[list-item]
        deadline = time.monotonic() + self.max_delay if self.max_delay > 0 else None
        stop = False
        while len(batch) < self.max_batch:
            try:
                if deadline is None:
                    nxt = self._queue.get_nowait()
                else:
                    remaining = deadline - time.monotonic()
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                stop = True
                break
            batch.append(nxt)  # type: ignore[arg-type]
        return batch, stop

    def _run(self) -> None:
        while True:
            batch, stop = self._take_batch()
            if batch:
                self.commit(batch)
            if stop:
                return

    def commit(self, batch: list[_Pending]) -> None:
        """Make one batch durable and resolve every waiter in it (never raises)."""
        try:
            outcomes = self._commit(batch)
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about it, then we go on
            self.stats.failed_batches += 1
            log.error("group commit of %d instance(s) failed: %s: %s", len(batch), type(exc).__name__, exc)
            for item in batch:
                if not item.done.is_set():
                    self.spool.discard(item.staged)
                    item.resolve(error=exc)
            return
        self.stats.add(len(batch))
        for item, outcome in zip(batch, outcomes, strict=True):
            item.resolve(outcome=outcome)

    def _commit(self, batch: list[_Pending]) -> list[RecordOutcome]:
        fsync = self.spool.fsync
        published: set[int] = set()

        def make_durable(fresh: list[int]) -> None:
            # Called by the ledger inside the batch's transaction, after its duplicate check and before
            # any row is written: data durable (filesystem mode), then names, then their directories.
            todo = [i for i in fresh if i not in published]
            if not todo:
                return
            if fsync and self.sync_mode == "filesystem":
                sync_filesystem(self.spool.studies_dir)
            for i in todo:
                self.spool.publish(batch[i].staged)
                published.add(i)
            if fsync:
                fsync_dirs(batch[i].staged.final.parent for i in todo)

        outcomes = self.ledger.record_instances([p.record for p in batch], before_write=make_durable)
        for i, p in enumerate(batch):
            if i not in published:
                self.spool.discard(p.staged)  # a duplicate: the first copy is kept
        return outcomes
