"""Disk low-water mark against a real `serve` on a real, small tmpfs spool: once a filler takes the free
space under ``spool.min_free_mb`` every C-STORE is answered 0xA700 and nothing is written (no spool
file, no quarantine, no ledger row), C-ECHO still answers, one log line says why, readiness reports it;
when the filler is removed the next C-STORE is stored, with nothing restarted (issue 17, item 5)."""
from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FAULT_ROUNDS, Figures, require, write_instance
from faultlib import Proc, SendLog, base_env, echo_from, report_measure, send_files

from dicom_fusion.service.config import load_settings
from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.errors import SpoolError
from dicom_fusion.service.ops.readiness import check_spool
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Instance
from dicom_fusion.service.storage.spool import free_mb

pytestmark = pytest.mark.faults

DISK_MB, MIN_FREE_MB = 48, 24
ROOT = "1.2.826.0.1.3680043.8.498.73"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "spool"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mnt)], capture_output=True)
    require(res.returncode == 0, "a tmpfs mount (run the tests as root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _files(spool: Path) -> list[Path]:
    return [p for sub in ("studies", "quarantine") for p in (spool / sub).rglob("*") if p.is_file()]


def test_low_water_mark(tmp_path: Path, small_disk: Path, figures: Figures, raw_send: None,
                        request: pytest.FixtureRequest) -> None:
    port = free_port()
    data = tmp_path / "var"
    env = base_env(data, port, DICOM_FUSION_SPOOL__DIR=str(small_disk),
                   DICOM_FUSION_SPOOL__MIN_FREE_MB=str(MIN_FREE_MB))
    log_path = tmp_path / "serve.log"
    serve = Proc(["serve", "--no-worker"], env, log_path, tmp_path).start(wait_port=port)
    settings = load_settings(None, data_dir=data, spool={"dir": small_disk, "min_free_mb": MIN_FREE_MB})
    ledger = Ledger(f"sqlite:///{data / 'ledger.sqlite'}")
    sent: dict[str, int | None] = {}
    try:
        def store(name: str, path: Path | None = None) -> int | None:
            sop = f"{ROOT}.1.{len(sent) + 1}"
            f = path or write_instance(tmp_path / "in" / f"{sop}.dcm", study_uid=ROOT, series_uid=f"{ROOT}.1",
                                       sop_uid=sop, rows=512)
            log = SendLog()
            send_files(port, [f], log)
            sent[name] = log.acked.get(f.stem)
            return sent[name]

        assert store("before") == 0x0000
        assert "MB free" in check_spool(settings)
        before = _files(small_disk)
        filler = small_disk / "filler.bin"
        filler.write_bytes(b"\0" * int((free_mb(small_disk) - MIN_FREE_MB / 2) * 2**20))
        assert free_mb(small_disk) < MIN_FREE_MB
        low = [store(f"low-{i}") for i in range(FAULT_ROUNDS * 3)]
        cut = tmp_path / "in" / "cut.dcm"
        cut.write_bytes(before[0].read_bytes()[:-100])  # not quarantined either: nothing is written while low
        low.append(store("low-truncated", cut))
        echo_while_low = echo_from(port)
        with pytest.raises(SpoolError, match="under spool.min_free_mb"):
            check_spool(settings)
        written_while_low = [p for p in _files(small_disk) if p not in before]
        filler.unlink()
        returned = time.monotonic()
        after = store("after")
        resumed_s = time.monotonic() - returned
        assert "MB free" in check_spool(settings)
        with ledger.session() as s:
            rows = s.query(Instance).count()
        text = log_path.read_text(errors="replace")
        low_lines = sum(1 for line in text.splitlines() if "under spool.min_free_mb" in line)
        back_lines = sum(1 for line in text.splitlines() if "back above spool.min_free_mb" in line)

        figures.rounds, figures.sent = FAULT_ROUNDS, len(sent)
        figures.acknowledged = sum(1 for st in sent.values() if st == 0x0000)
        figures.stored = rows
        figures.crashes = int(not serve.alive)
        report_measure(request.config, "low_water_mark",
                       f"{len(low)} C-STORE under the mark ({MIN_FREE_MB} MB on a {DISK_MB} MB tmpfs): "
                       f"{sum(1 for st in low if st == 0xA700)} answered 0xA700, {len(written_while_low)} file(s) "
                       f"written; C-ECHO {'answered' if echo_while_low else 'NOT answered'}; {low_lines} log "
                       f"line(s) while low, {back_lines} when space returned; next C-STORE stored "
                       f"{resumed_s:.2f} s after the space returned")
        assert low == [0xA700] * len(low)
        assert written_while_low == []
        assert echo_while_low
        assert after == 0x0000
        assert rows == 2
        assert low_lines == 1 and back_lines == 1
        assert serve.alive
    finally:
        serve.stop()
        ledger.close()
