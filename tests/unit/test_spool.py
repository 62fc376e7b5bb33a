import errno
import os
from pathlib import Path

import pytest

from dicom_fusion.service.errors import MalformedInstanceError, SpoolError
from dicom_fusion.service.storage.spool import Spool, check_uid, write_durable

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def _store(spool: Spool, data: bytes) -> tuple[Path, bool]:
    """Stage then publish, as the group committer does: (final path, created)."""
    staged = spool.stage(STUDY, SERIES, SOP, data, sync_data=True)
    return staged.final, spool.publish(staged)


def test_store_is_byte_exact_and_content_addressed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.ensure()
    a, created = _store(spool, b"abc")
    assert created and a.read_bytes() == b"abc"
    again, created = _store(spool, b"abc")
    assert not created and again == a
    other, _ = _store(spool, b"different")
    assert other != a and a.read_bytes() == b"abc"  # first copy never overwritten


def test_no_temp_files_left(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    _store(spool, b"x" * 10000)
    _store(spool, b"x" * 10000)  # the duplicate's temp name is dropped too
    leftovers = [p for p in tmp_path.rglob(".tmp-*")]
    assert leftovers == []


def test_fsync_called_on_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    write_durable(tmp_path / "a" / "b.dcm", b"data")
    assert len(synced) >= 3  # file, its directory, and the newly created directory's parent


def test_disk_full_becomes_spool_error_and_leaves_nothing(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)
    spool.ensure()

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(SpoolError, match="disk full"):
        _store(spool, b"abc")
    monkeypatch.undo()
    assert [p for p in spool.studies_dir.rglob("*") if p.is_file()] == []


def test_unwritable_spool_fails_at_start(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores permissions; use a path below a regular file instead
        (tmp_path / "file").write_text("x")
        spool = Spool(tmp_path / "file" / "spool")
        with pytest.raises((SpoolError, OSError)):
            spool.ensure()
        return
    tmp_path.chmod(0o500)
    try:
        with pytest.raises((SpoolError, OSError)):
            Spool(tmp_path / "spool").ensure()
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.parametrize("bad", ["", "1.2.abc", "../../etc", "1." * 40, None])
def test_check_uid_rejects_unsafe_values(bad: object) -> None:
    with pytest.raises(MalformedInstanceError):
        check_uid(bad, "StudyInstanceUID")


def test_quarantine_keeps_bytes_and_reason(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.ensure()
    p = spool.quarantine(b"garbage", "cannot parse", calling_ae="X")
    assert p is not None and p.read_bytes() == b"garbage"
    assert "cannot parse" in p.with_suffix(".json").read_text()
