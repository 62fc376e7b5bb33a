"""Which spooled files a job reads (jobs/stages._job_files): a file the ledger holds that this host cannot
see, or one outside this host's spool, makes the job wait with the file and `spool.dir` named (README
"Start each piece": the spool is shared by every host)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from dicom_fusion.service.errors import TransientError
from dicom_fusion.service.jobs.stages import _job_files


def _rt(spool: Path, paths: list[Path]) -> SimpleNamespace:
    ledger = SimpleNamespace(study_files=lambda study_id, series_uids: list(paths))
    return SimpleNamespace(ledger=ledger, spool=SimpleNamespace(root=spool))


def _job() -> SimpleNamespace:
    return SimpleNamespace(study_id=1, series_uids=("1.2.3",))


def test_files_in_the_spool_are_read(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    files = [spool / "studies" / f"{i}.dcm" for i in range(3)]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    assert _job_files(_rt(spool, files), _job()) == files


def test_a_file_missing_on_this_host_makes_the_job_wait(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    present, gone = spool / "studies" / "a.dcm", spool / "studies" / "b.dcm"
    present.parent.mkdir(parents=True)
    present.write_bytes(b"x")
    with pytest.raises(TransientError, match=r"1 of the study's 2 .* not on this host, e\.g\. .*b\.dcm: spool\.dir"):
        _job_files(_rt(spool, [present, gone]), _job())


def test_a_file_outside_this_hosts_spool_makes_the_job_wait(tmp_path: Path) -> None:
    """The listener wrote to another spool.dir: even where its path is readable (one machine), the job's
    own files would land in a spool the other stages do not read."""
    theirs = tmp_path / "listener-spool" / "studies" / "a.dcm"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"x")
    (tmp_path / "worker-spool").mkdir()
    with pytest.raises(TransientError, match="outside this host's spool"):
        _job_files(_rt(tmp_path / "worker-spool", [theirs]), _job())


def test_a_symlinked_spool_root_is_the_same_spool(tmp_path: Path) -> None:
    real = tmp_path / "real"
    f = real / "studies" / "a.dcm"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"x")
    (tmp_path / "link").symlink_to(real)
    assert _job_files(_rt(tmp_path / "link", [f]), _job()) == [f]
