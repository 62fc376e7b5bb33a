"""The spool's low-water mark (ingest/lowwater.py, storage/spool.spool_space, readiness.check_spool):
refuse under the mark, one log line a minute while low, one when space is back, resume by itself."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from dicom_fusion.service.config import load_settings
from dicom_fusion.service.errors import SpoolError
from dicom_fusion.service.ingest.lowwater import LowWaterMark
from dicom_fusion.service.ops.readiness import check_spool
from dicom_fusion.service.storage.spool import free_mb, spool_space


def test_refuses_under_the_mark_logs_once_a_minute_and_resumes(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    free = [5000.0]
    now = [100.0]
    mark = LowWaterMark(tmp_path, 2048, probe=lambda _p: free[0], clock=lambda: now[0],
                        logger=logging.getLogger("test.lowwater"))
    with caplog.at_level("WARNING", logger="test.lowwater"):
        assert not mark.refuse() and not mark.low
        free[0] = 1000.0
        for _ in range(50):  # a PACS retrying every second for 50 s: one line
            assert mark.refuse()
            now[0] += 1.0
        assert mark.low
        assert len(caplog.records) == 1
        now[0] += 10.0  # a minute after the first line: the second, with the count
        assert mark.refuse()
        free[0] = 3000.0
        assert not mark.refuse() and not mark.low
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "1000 MB is under spool.min_free_mb (2048 MB)" in lines[0] and "(1 refused" in lines[0]
    assert "(50 refused since the last line)" in lines[1]
    assert "back above" in lines[2] and "storing again" in lines[2]


def test_zero_is_off_and_an_unreadable_spool_does_not_refuse(tmp_path: Path) -> None:
    assert not LowWaterMark(tmp_path, 0, probe=lambda _p: 0.0).refuse()

    def broken(_p: Path) -> float:
        raise FileNotFoundError(2, "No such file or directory")

    assert not LowWaterMark(tmp_path, 2048, probe=broken).refuse()
    with pytest.raises(ValueError, match="min_free_mb"):
        LowWaterMark(tmp_path, -1)


def test_free_space_probe_matches_the_filesystem(tmp_path: Path) -> None:
    expected = shutil.disk_usage(tmp_path).free / 2**20
    assert free_mb(tmp_path) == pytest.approx(expected, rel=0.01, abs=64)
    space = spool_space(tmp_path, min_free_mb=expected * 10)
    assert space is not None and space.low
    assert not spool_space(tmp_path, min_free_mb=0).low  # type: ignore[union-attr]
    assert spool_space(tmp_path / "missing", 1) is None
    assert LowWaterMark(tmp_path, expected * 10).refuse()  # the real probe, a mark above the free space
    assert not LowWaterMark(tmp_path, 1).refuse()


def test_readiness_reports_the_low_water_mark(tmp_path: Path) -> None:
    low = load_settings(None, data_dir=tmp_path, spool={"min_free_mb": 10**9})
    with pytest.raises(SpoolError, match=r"under spool.min_free_mb .*0xA700"):
        check_spool(low)
    ok = load_settings(None, data_dir=tmp_path, spool={"min_free_mb": 1})
    assert "MB free" in check_spool(ok)
