"""STOW-RS (PS3.18 10.5, "Store Instances"): the ingest side, HTTP-free.

The API's route (``ops/api/routes/dicomweb.py``) feeds the request body to a :class:`StowRequest` chunk by
chunk as it comes off the socket; each ``application/dicom`` part is streamed (:mod:`.multipart`) to a temp
file in ``<spool>/incoming/`` (hashed as it is written; never the whole part, let alone the request, in
memory), and when the part ends it gets the C-STORE handler's checks on a memory map of that file:

- :func:`~.listener.check_received` (:mod:`.wellformed`: every element header walked to the end, the
  encoding as declared; the filing UIDs): failures are 0xC000 and quarantined with the reason, as C-STORE;
- a SOP class the listener does not accept (not a storage SOP class): 0x0122;
- ``/studies/{StudyInstanceUID}``: an instance of another study is 0xA900 and quarantined (C-STORE's
  0xA900 is an instance that does not match its request);
- a part of another media type: 0xC000 (nothing written).

A good part is staged (:meth:`Spool.adopt <dicom_fusion.service.storage.spool.Spool.adopt>`); in ``file``
sync mode its data is fdatasync'ed in a small pool while the next parts arrive, and waited for before the
commit. Only once the body's closing boundary has arrived are the staged parts
handed to the :class:`~.committer.GroupCommitter` — the listener's group commit, so the same durability
contract (data, then name, then ledger row, all durable before the answer) and the same duplicate rule
(``storage/ledger_batch.py``: a SOP Instance UID already held is a success, its second copy discarded). A
body that ends early (truncated, the client gone, over ``dicomweb.max_request_mb``) stores nothing: every
staged part is discarded and the error says where it ended. (The client cannot learn from a cut request
what was stored, and resends it whole; a duplicate costs nothing.)

The instances' calling AE in the ledger is ``dicomweb.calling_ae`` (default ``STOW``): routes can match on
it like on a modality's AE title; completion is the quiet period, as for C-STORE.

Nothing here logs a value of a data set: reasons name parts by their position, tags and byte offsets.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import mmap
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom.sop_class import _STORAGE_CLASSES  # noqa: PLC2701 - what the listener accepts

from dicom_fusion.service.errors import MalformedInstanceError, ServiceError, SpoolError
from dicom_fusion.service.ingest.committer import CommitError, GroupCommitter
from dicom_fusion.service.ingest.listener import check_received
from dicom_fusion.service.ingest.lowwater import LowWaterMark
from dicom_fusion.service.ingest.multipart import MultipartError, MultipartParser, parse_content_type
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import FilingHeader
from dicom_fusion.service.storage.spool import Spool, StagedFile, check_uid

log = logging.getLogger(__name__)
__all__ = ["MultipartError", "PartResult", "RequestTooLarge", "StowIngest", "StowOutcome", "StowRequest",
           "StowUnavailable", "UnsupportedMediaType", "check_request_type"]

# Failure Reason (0008,1197) values, PS3.18 Table I.2-2
OUT_OF_RESOURCES = 0xA700  # A7xx: not stored, out of resources (disk full, ledger down)
DOES_NOT_MATCH = 0xA900  # A9xx: data set does not match (here: an instance of another study than the URL's)
CANNOT_UNDERSTAND = 0xC000  # Cxxx: not well-formed, unparseable, UIDs missing, not application/dicom
PROCESSING_FAILURE = 0x0110  # a general failure processing the part
SOP_CLASS_NOT_SUPPORTED = 0x0122  # not a storage SOP class (the listener would not negotiate it)

_STORAGE_UIDS = frozenset(str(uid) for uid in _STORAGE_CLASSES.values())
DICOM_MEDIA_TYPE = "application/dicom"
STALE_INCOMING_SECONDS = 3600.0  # temp files older than this in incoming/ belong to no running request
SYNC_THREADS = 4  # concurrent fdatasyncs of a process's STOW-RS parts (``file`` sync mode)


class UnsupportedMediaType(ServiceError):
    """The request is not ``multipart/related; type="application/dicom"`` (→ HTTP 415)."""


class RequestTooLarge(ServiceError):
    """The body exceeds ``dicomweb.max_request_mb`` (→ HTTP 413, nothing stored)."""


class StowUnavailable(ServiceError):
    """Nothing can be stored now: the spool is under its low-water mark or not writable (→ HTTP 503)."""


@dataclass(frozen=True)
class PartResult:
    """One body part's outcome: stored (``failure is None``; ``duplicate`` when the ledger already held
    its SOP Instance UID) or its Failure Reason with the reason in words."""

    index: int  # 1-based position in the body
    sop_class_uid: str = ""
    sop_uid: str = ""
    study_uid: str = ""
    failure: int | None = None
    reason: str = ""
    duplicate: bool = False

    @property
    def stored(self) -> bool:
        return self.failure is None


@dataclass(frozen=True)
class StowOutcome:
    parts: list[PartResult]

    @property
    def stored(self) -> list[PartResult]:
        return [p for p in self.parts if p.stored]

    @property
    def failed(self) -> list[PartResult]:
        return [p for p in self.parts if not p.stored]

    @property
    def http_status(self) -> int:
        """PS3.18 10.5.3: 200 every instance stored, 202 some failed, 409 none stored."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409


def check_request_type(content_type: str) -> str:
    """The boundary of a STOW-RS request's ``Content-Type``; :class:`UnsupportedMediaType` unless it is
    ``multipart/related`` with ``type="application/dicom"`` (or no type), :class:`MultipartError` when
    the boundary is missing or malformed."""
    try:
        media, params = parse_content_type(content_type)
    except MultipartError as exc:
        raise UnsupportedMediaType(f"cannot read the Content-Type: {exc}") from exc
    if media != "multipart/related":
        raise UnsupportedMediaType(f"Content-Type {media or '(none)'} is not supported: send multipart/related; "
                                   'type="application/dicom"; boundary=...')
    kind = params.get("type", DICOM_MEDIA_TYPE).lower()
    if kind != DICOM_MEDIA_TYPE:
        raise UnsupportedMediaType(f'multipart/related of type "{kind}" is not supported: only '
                                   f'type="{DICOM_MEDIA_TYPE}" (Part 10 instances), not metadata + bulk data')
    boundary = params.get("boundary", "")
    if not boundary:
        raise MultipartError("the multipart/related Content-Type has no boundary parameter")
    return boundary


class StowIngest:
    """One per API process: the spool, a group committer on the ledger, the low-water mark. Started on the
    first request (:meth:`ensure_started`), so an API without the spool volume serves everything else."""

    def __init__(self, spool: Spool, ledger: Ledger, *, calling_ae: str, max_request_bytes: int,
                 min_free_mb: float = 0.0, max_batch: int = 64, max_delay: float = 0.0,
                 wait_timeout: float = 120.0) -> None:
        self.spool = spool
        self.calling_ae = calling_ae
        self.max_request_bytes = max_request_bytes
        self.committer = GroupCommitter(spool, ledger, sync_mode=spool.sync_mode,  # type: ignore[arg-type]
                                        max_batch=max_batch, max_delay=max_delay, wait_timeout=wait_timeout)
        self.low_water = LowWaterMark(spool.root, min_free_mb)
        self._lock = threading.Lock()
        self._started = False
        self._syncer = ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="stow-sync")

    def ensure_started(self) -> None:
        """Create the spool's layout (``incoming/`` included), drop stale temp files, start the committer.
        Raises :class:`StowUnavailable` when the spool is not writable."""
        with self._lock:
            if self._started:
                return
            try:
                self.spool.ensure()
                self.spool.incoming_dir.mkdir(exist_ok=True)
            except (SpoolError, OSError) as exc:
                raise StowUnavailable(f"STOW-RS cannot store: {exc}") from exc
            self._drop_stale()
            self.committer.start()
            self._syncer = ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="stow-sync")  # threads start on use
            self._started = True

    def _drop_stale(self) -> None:
        cutoff = time.time() - STALE_INCOMING_SECONDS
        for path in self.spool.incoming_dir.glob(".stow-*"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()

    def stop(self) -> None:
        with self._lock:
            if self._started:
                self._syncer.shutdown(wait=True)
                self.committer.stop()
                self._started = False

    def sync_and_close(self, fd: int, *, sync: bool) -> Future[None]:
        """fdatasync ``fd`` (when ``sync``) and close it, in the sync pool: a request's parts sync
        concurrently with each other and with the body still arriving."""
        def run() -> None:
            try:
                if sync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)

        return self._syncer.submit(run)

    def begin(self, content_type: str, *, study_uid: str | None = None, who: str = "") -> StowRequest:
        """A request about to stream: checks its Content-Type (:class:`UnsupportedMediaType`,
        :class:`MultipartError`), the target study UID (:class:`MultipartError` — a bad URL is a bad
        request) and the spool (:class:`StowUnavailable`) before a byte of the body is read."""
        boundary = check_request_type(content_type)
        if study_uid is not None:
            try:
                study_uid = check_uid(study_uid, "StudyInstanceUID")
            except MalformedInstanceError as exc:
                raise MultipartError(f"the URL's {exc}") from exc
        self.ensure_started()
        if self.low_water.refuse():
            raise StowUnavailable(f"the spool's free space is under spool.min_free_mb ({self.low_water.min_free_mb:.0f}"
                                  " MB): nothing is stored until space returns; send again later")
        return StowRequest(self, boundary, study_uid=study_uid, who=who)


@dataclass
class _Part:
    index: int
    fd: int = -1
    tmp: Path | None = None
    hasher: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    failure: PartResult | None = None  # decided before its end (another media type, a write error)


class StowRequest:
    """One request's body: ``feed`` it, then ``finish`` (or ``abort``). Not thread-safe: one caller."""

    def __init__(self, ingest: StowIngest, boundary: str, *, study_uid: str | None, who: str) -> None:
        self.ingest = ingest
        self.spool = ingest.spool
        self.study_uid = study_uid
        self.who = who
        self.received = 0
        self.started = time.monotonic()
        self._parser = MultipartParser(boundary, self)
        self._part: _Part | None = None
        self._results: dict[int, PartResult] = {}
        # (index, header, staged file, its fdatasync+close running in the ingest's sync pool)
        self._staged: list[tuple[int, FilingHeader, StagedFile, Future[None]]] = []

    # ---- the body -----------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        """The next bytes of the body. Raises :class:`RequestTooLarge` past ``dicomweb.max_request_mb`` and
        :class:`MultipartError` on a malformed body (the caller then calls :meth:`abort`)."""
        self.received += len(chunk)
        if self.received > self.ingest.max_request_bytes:
            raise RequestTooLarge(f"the body exceeds dicomweb.max_request_mb "
                                  f"({self.ingest.max_request_bytes / 2**20:.0f} MB): nothing stored; send "
                                  "fewer instances per request")
        self._parser.feed(chunk)

    def finish(self) -> StowOutcome:
        """The body has ended: commit every staged part (one group commit) and say what became of each.
        Raises :class:`MultipartError` (everything discarded) when the body ended before its closing
        boundary."""
        try:
            self._parser.close()
        except MultipartError:
            self.abort()
            raise
        committer = self.ingest.committer
        waiting = []
        for index, header, staged, synced in self._staged:
            error = _sync_result(synced)
            if error is not None:  # its data could not be made durable: not stored
                self.spool.discard(staged)
                self._reject(self._failed(index, header, OUT_OF_RESOURCES, str(self.spool._error(error))))
                continue
            try:
                waiting.append((index, header, committer.submit(header, staged, calling_ae=self.ingest.calling_ae)))
            except CommitError as exc:
                self._results[index] = self._failed(index, header, OUT_OF_RESOURCES, str(exc))
        self._staged = []
        for index, header, pending in waiting:
            try:
                outcome = committer.wait(pending)
            except CommitError as exc:
                self._results[index] = self._failed(index, header, OUT_OF_RESOURCES, str(exc))
                continue
            self._results[index] = PartResult(index, header.sop_class_uid, header.sop_uid, header.study_uid,
                                              duplicate=not outcome.new)
        outcome_ = StowOutcome([self._results[i] for i in sorted(self._results)])
        log.info("STOW-RS from %s: %d part(s), %d stored (%d already held), %d failed; %.1f MB in %.2f s",
                 self.who or "?", len(outcome_.parts), len(outcome_.stored),
                 sum(p.duplicate for p in outcome_.parts), len(outcome_.failed), self.received / 2**20,
                 time.monotonic() - self.started)
        return outcome_

    def abort(self) -> None:
        """Discard everything this request staged (and the part being written)."""
        if self._part is not None:
            self._drop_temp(self._part)
            self._part = None
        for _, _, staged, synced in self._staged:
            _sync_result(synced)  # its descriptor closed
            self.spool.discard(staged)
        self._staged = []

    # ---- multipart receiver -------------------------------------------------------------------
    def start(self, headers: dict[str, str]) -> None:
        part = _Part(index=self._parser.parts)
        self._part = part
        raw_type = headers.get("content-type", "text/plain")  # RFC 2046: no Content-Type is text/plain
        try:
            media, _ = parse_content_type(raw_type)
        except MultipartError:
            media = raw_type[:60]
        if media != DICOM_MEDIA_TYPE:
            part.failure = PartResult(part.index, failure=CANNOT_UNDERSTAND,
                                      reason=f"part {part.index} is {media or '(no type)'}, not {DICOM_MEDIA_TYPE}")
            return
        part.tmp = self.spool.incoming_dir / f".stow-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            part.fd = os.open(part.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            part.failure = self._write_failed(part, exc)

    def data(self, chunk: bytes) -> None:
        part = self._part
        assert part is not None
        if part.failure is not None:
            return  # skipped: another media type, or it could not be written
        try:
            view = memoryview(chunk)
            while view:
                n = os.write(part.fd, view)
                view = view[n:]
        except OSError as exc:
            part.failure = self._write_failed(part, exc)
            self._drop_temp(part)
            return
        part.hasher.update(chunk)
        part.size += len(chunk)

    def end(self) -> None:
        part, self._part = self._part, None
        assert part is not None
        if part.failure is not None:
            self._reject(part.failure)
            return
        assert part.tmp is not None
        try:
            header = self._check(part)  # reads the file through its own descriptor (page cache)
        except _Refused as refused:
            self._reject(refused.result, refused.quarantined)
            self._drop_temp(part)
            return
        sync = self.ingest.committer.sync_mode == "file" and self.spool.fsync
        try:
            staged = self.spool.adopt(part.tmp, header.study_uid, header.series_uid, header.sop_uid,
                                      sha256=part.hasher.hexdigest(), size=part.size, data_synced=sync)
        except SpoolError as exc:
            self._reject(self._failed(part.index, header, OUT_OF_RESOURCES, str(exc)))
            self._drop_temp(part)
            return
        # ``file`` sync mode: fdatasync in the pool while the next parts stream in; finish() waits for it
        # before the part is handed to the committer (data durable before its name and row, as C-STORE)
        fd, part.fd = part.fd, -1
        self._staged.append((part.index, header, staged, self.ingest.sync_and_close(fd, sync=sync)))

    # ---- checks -------------------------------------------------------------------------------
    def _check(self, part: _Part) -> FilingHeader:
        """The C-STORE handler's checks on the part's file, through a memory map (no copy in memory).
        Raises :class:`_Refused`; a malformed or mismatched part is quarantined first."""
        assert part.tmp is not None
        if part.size == 0:
            raise _Refused(PartResult(part.index, failure=CANNOT_UNDERSTAND, reason=f"part {part.index} is empty"))
        with open(part.tmp, "rb") as fh:
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            reason = ""
            try:
                header = check_received(data)
            except MalformedInstanceError as exc:
                reason = str(exc)
            if reason:  # outside the except block: its traceback holds views of the map until it ends
                raise _Refused(PartResult(part.index, failure=CANNOT_UNDERSTAND, reason=f"part {part.index}: {reason}"),
                               self.spool.quarantine(data, reason, calling_ae=self.ingest.calling_ae))
            if header.sop_class_uid not in _STORAGE_UIDS:
                raise _Refused(self._failed(part.index, header, SOP_CLASS_NOT_SUPPORTED,
                                            f"SOP class {header.sop_class_uid} is not a storage SOP class"))
            if self.study_uid is not None and header.study_uid != self.study_uid:
                reason = f"the instance is of study {header.study_uid}, not the URL's {self.study_uid}"
                raise _Refused(self._failed(part.index, header, DOES_NOT_MATCH, reason),
                               self.spool.quarantine(data, reason, calling_ae=self.ingest.calling_ae))
            return header
        finally:
            _close_map(data)

    # ---- outcomes -----------------------------------------------------------------------------
    @staticmethod
    def _failed(index: int, header: FilingHeader, code: int, reason: str) -> PartResult:
        return PartResult(index, header.sop_class_uid, header.sop_uid, header.study_uid, failure=code,
                          reason=f"part {index}: {reason}")

    def _write_failed(self, part: _Part, exc: OSError) -> PartResult:
        err = self.spool._error(exc)  # "disk full" or the OS's words, with the spool's path
        return PartResult(part.index, failure=OUT_OF_RESOURCES, reason=f"part {part.index}: {err}")

    def _reject(self, result: PartResult, quarantined: Path | None = None) -> None:
        self._results[result.index] = result
        log.warning("STOW-RS from %s: %s (0x%04X)%s", self.who or "?", result.reason, result.failure or 0,
                    f"; quarantined at {quarantined}" if quarantined else "")

    @staticmethod
    def _drop_temp(part: _Part) -> None:
        if part.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(part.fd)
            part.fd = -1
        if part.tmp is not None:
            part.tmp.unlink(missing_ok=True)


def _sync_result(done: Future[None]) -> OSError | None:
    """Wait for a part's fdatasync + close; the OS error if it failed."""
    try:
        done.result()
    except OSError as exc:
        return exc
    return None


def _close_map(data: mmap.mmap) -> None:
    """Unmap; a view still held by an exception's traceback is collected first (else the map stays until
    the view goes: never an error for the request)."""
    try:
        data.close()
    except BufferError:
        gc.collect()
        with contextlib.suppress(BufferError):
            data.close()


class _Refused(Exception):  # noqa: N818 - internal control flow: a part's failure, and where it is quarantined
    def __init__(self, result: PartResult, quarantined: Path | None = None) -> None:
        super().__init__(result.reason)
        self.result = result
        self.quarantined = quarantined
