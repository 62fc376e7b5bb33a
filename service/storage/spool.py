"""Durable, content-addressed storage of received instances.

An instance is acknowledged to the sender only after its bytes are on disk: written to a temp name,
fsynced, linked to its final name, and the directory fsynced. The final name carries the SOP Instance
UID and a prefix of the content hash, so two different encodings of one UID never overwrite each
other (the ledger decides which one is *the* instance) and the same bytes always land on the same
name (a resend is a no-op). Bytes are stored exactly as received: no decode, no re-encode.

The listener's group commit (:mod:`.committer`) splits the same steps so that many instances share
the expensive ones: :meth:`Spool.stage` writes the temp file (and, in ``file`` sync mode, fdatasyncs
it in the receiving thread, concurrently with other associations), :func:`sync_filesystem` makes a
whole batch's data durable with one ``syncfs`` (``filesystem`` mode), :meth:`Spool.publish` links a
durable temp file to its final name, and :func:`fsync_dirs` fsyncs each directory a batch touched
once. The order is the same as :func:`write_durable`'s: data durable, then the name, then the row.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dicom_fusion.service.errors import MalformedInstanceError, SpoolError

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(value: object, name: str) -> str:
    """Validate a DICOM UID before it becomes part of a path (inputs validated at the boundary)."""
    uid = str(value or "").strip().rstrip("\x00")
    if not uid:
        raise MalformedInstanceError(f"{name} is missing")
    if len(uid) > 64 or not _UID_RE.match(uid):
        raise MalformedInstanceError(f"{name} {uid[:70]!r} is not a valid DICOM UID")
    return uid


@dataclass(frozen=True)
class StagedFile:
    """Received bytes in a temp file beside their final name, not yet published (see :meth:`Spool.stage`)."""

    tmp: Path
    final: Path
    sha256: str
    size: int
    data_synced: bool  # fdatasync'ed already (``file`` sync mode)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dirs(dirs: Iterable[Path]) -> None:
    """fsync each directory once (the names a batch created become durable)."""
    for d in dict.fromkeys(dirs):
        _fsync_dir(d)


_libc: ctypes.CDLL | None = None


def sync_filesystem(path: Path) -> None:
    """Flush every dirty page and inode of the filesystem holding ``path`` (Linux ``syncfs``).

    One call makes a whole batch of unsynced files durable with one journal commit. Where
    ``syncfs`` is missing (not Linux/glibc) it falls back to ``sync()``, which is slower but as safe.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "syncfs", None)
    if fn is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _create(path: Path, data: bytes, sync: Callable[[int], None] | None) -> None:
    """Create ``path`` (which must not exist) holding ``data``, synced with ``sync`` (os.fsync or
    os.fdatasync) before it is closed; a failure removes the partial file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if sync is not None:
            sync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def write_temp(path: Path, data: bytes, *, sync: bool) -> None:
    """Create ``path`` (which must not exist) holding ``data``; fdatasync it when ``sync``."""
    _create(path, data, os.fdatasync if sync else None)


def _makedirs_durable(path: Path, *, fsync: bool) -> None:
    """Create missing directories and fsync each new entry's parent, so the path survives a crash."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        if fsync:
            _fsync_dir(d.parent)


def write_durable(final: Path, data: bytes, *, fsync: bool = True, replace: bool = False) -> bool:
    """Write ``data`` to ``final`` atomically and durably; returns False if it already existed.

    With ``replace=False`` an existing file is kept (content-addressed names make it identical).
    """
    _makedirs_durable(final.parent, fsync=fsync)
    tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
    _create(tmp, data, os.fsync if fsync else None)
    try:
        if replace:
            os.replace(tmp, final)
            created = True
        else:
            try:
                os.link(tmp, final)
                created = True
            except FileExistsError:
                created = False
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync and created:
        _fsync_dir(final.parent)
    return created


@dataclass(frozen=True)
class SpoolSpace:
    """Free space on the spool's filesystem against ``spool.min_free_mb`` (the low-water mark)."""

    free_mb: float
    min_free_mb: float

    @property
    def low(self) -> bool:
        """Under the low-water mark: the listener refuses C-STORE (0xA700) until space returns."""
        return self.free_mb < self.min_free_mb


def free_mb(path: Path) -> float:
    """MiB an unprivileged writer can still use on the filesystem holding ``path`` (``statvfs``)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / (1024 * 1024)


def spool_space(path: Path, min_free_mb: float) -> SpoolSpace | None:
    """The spool's free space against its low-water mark; None when ``path`` cannot be read (the
    caller runs without the spool volume)."""
    try:
        return SpoolSpace(free_mb=round(free_mb(path), 1), min_free_mb=min_free_mb)
    except OSError:
        return None


class Spool:
    """The spool directory: ``studies/<study>/<series>/<sop>.<sha12>.dcm``, ``quarantine/``, ``jobs/``."""

    def __init__(self, root: Path, *, fsync: bool = True, sync_mode: str = "file") -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.sync_mode = sync_mode  # how the listener's group commit syncs data: "file" | "filesystem"
        self.studies_dir = self.root / "studies"
        self.quarantine_dir = self.root / "quarantine"
        self.jobs_dir = self.root / "jobs"
        self.incoming_dir = self.root / "incoming"  # STOW-RS parts while they stream in (same filesystem)

    def ensure(self) -> None:
        """Create the layout and prove the spool is writable (fails at start-up, not on first C-STORE)."""
        for d in (self.studies_dir, self.quarantine_dir, self.jobs_dir):
            _makedirs_durable(d, fsync=self.fsync)
        probe = self.root / f".probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise SpoolError(f"spool directory {self.root} is not writable: {exc.strerror}; "
                             "fix its permissions or set spool.dir") from exc

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> Path:
        return self.studies_dir / study_uid / series_uid / f"{sop_uid}.{sha256[:12]}.dcm"

    def stage(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes, *,
              sync_data: bool) -> StagedFile:
        """Write the received bytes to a temp file beside their final name (first half of a group
        commit; :meth:`publish` is the second). With ``sync_data`` the data is fdatasync'ed here.

        Raises :class:`SpoolError` (→ 0xA700) on any OS error; no temp file is left behind then.
        """
        digest = hashlib.sha256(data).hexdigest()
        final = self.instance_path(study_uid, series_uid, sop_uid, digest)
        tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            _makedirs_durable(final.parent, fsync=self.fsync)
            write_temp(tmp, data, sync=sync_data and self.fsync)
        except OSError as exc:
            raise self._error(exc) from exc
        return StagedFile(tmp=tmp, final=final, sha256=digest, size=len(data),
                          data_synced=sync_data and self.fsync)

    def adopt(self, tmp: Path, study_uid: str, series_uid: str, sop_uid: str, *, sha256: str, size: int,
              data_synced: bool) -> StagedFile:
        """Stage a temp file written elsewhere in the spool (STOW-RS streams each part into
        :attr:`incoming_dir`, on the same filesystem, before its UIDs are known): its final directory is
        created durably and :meth:`publish` links it there. Raises :class:`SpoolError` (→ 0xA700)."""
        final = self.instance_path(study_uid, series_uid, sop_uid, sha256)
        try:
            _makedirs_durable(final.parent, fsync=self.fsync)
        except OSError as exc:
            raise self._error(exc) from exc
        return StagedFile(tmp=tmp, final=final, sha256=sha256, size=size, data_synced=data_synced and self.fsync)

    def publish(self, staged: StagedFile) -> bool:
        """Link a staged file (its data already durable) to its final name and drop the temp name.

        Returns False when identical bytes were already stored under that name. The directory is
        not fsynced here: the caller fsyncs each directory of a batch once (:func:`fsync_dirs`).
        """
        try:
            try:
                os.link(staged.tmp, staged.final)
                created = True
            except FileExistsError:
                created = False
            staged.tmp.unlink()
        except OSError as exc:
            staged.tmp.unlink(missing_ok=True)
            raise self._error(exc) from exc
        return created

    @staticmethod
    def discard(staged: StagedFile) -> None:
        staged.tmp.unlink(missing_ok=True)

    def _error(self, exc: OSError) -> SpoolError:
        reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
        return SpoolError(f"cannot store instance in {self.root}: {reason}")

    def quarantine(self, data: bytes, reason: str, *, calling_ae: str) -> Path | None:
        """Keep a rejected dataset with a reason file beside it, for the operator to inspect.

        Best effort: a quarantine that cannot be written must not stop the listener answering.
        """
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        base = self.quarantine_dir / f"{stamp}-{uuid.uuid4().hex[:8]}"
        meta = {"reason": reason, "calling_ae": calling_ae, "received_at": stamp, "size": len(data)}
        try:
            write_durable(base.with_suffix(".dcm"), data, fsync=self.fsync)
            write_durable(base.with_suffix(".json"), json.dumps(meta, indent=2).encode(), fsync=self.fsync)
        except OSError:
            return None
        return base.with_suffix(".dcm")

    def job_dir(self, job_id: int) -> Path:
        d = self.jobs_dir / f"{job_id:08d}"
        d.mkdir(parents=True, exist_ok=True)
        return d
