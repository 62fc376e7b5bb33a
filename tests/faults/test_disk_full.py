"""Disk full: on a real, tiny tmpfs spool, C-STORE answers 0xA700 once space runs out, no partial file
is acknowledged or left behind, and the listener stores again as soon as space returns."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Figures, require, write_instance
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_fusion.service.config import ListenerSettings
from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.ingest.listener import Listener
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Instance
from dicom_fusion.service.storage.spool import Spool

pytestmark = pytest.mark.faults


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "spool"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    require(res.returncode == 0, "a tmpfs mount (run the tests as root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full(tmp_path: Path, tiny_disk: Path, figures: Figures) -> None:
    spool = Spool(tiny_disk)
    spool.ensure()
    filler = tiny_disk / "filler.bin"
    filler.write_bytes(b"\0" * 1024 * 1024)
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")
    listener = Listener(ListenerSettings(host="127.0.0.1", port=free_port()), spool, ledger)
    listener.start()
    try:
        ae = AE(ae_title="FILLER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", listener.settings.port, ae_title="DFUSION")
        assert assoc.is_established
        statuses = {}
        for i in range(40):  # 40 × 128 KB > the 2 MB left
            sop = f"1.2.826.0.1.3680043.8.498.88.1.{i + 1}"
            f = write_instance(tmp_path / "in" / f"{sop}.dcm", study_uid="1.2.826.0.1.3680043.8.498.88",
                               series_uid="1.2.826.0.1.3680043.8.498.88.1", sop_uid=sop, rows=256)
            statuses[sop] = int(assoc.send_c_store(f).Status)
        assert 0xA700 in statuses.values(), "the tmpfs should have filled up"
        assert set(statuses.values()) <= {0x0000, 0xA700}
        acked = {uid for uid, st in statuses.items() if st == 0}
        with ledger.session() as s:
            rows = {r.sop_uid: r for r in s.query(Instance)}
        assert set(rows) == acked
        on_disk = [p for p in spool.studies_dir.rglob("*") if p.is_file()]
        assert all(not p.name.startswith(".tmp-") for p in on_disk), "a partial file was left behind"
        assert len(on_disk) == len(acked)
        # space returns: the next instance is stored
        filler.unlink()
        first_refused = next(uid for uid, st in statuses.items() if st == 0xA700)
        again = write_instance(tmp_path / "again.dcm", study_uid="1.2.826.0.1.3680043.8.498.88",
                               series_uid="1.2.826.0.1.3680043.8.498.88.1", sop_uid=first_refused, rows=256)
        assert int(assoc.send_c_store(again).Status) == 0x0000
        assoc.release()
        figures.rounds, figures.sent = 1, len(statuses) + 1
        figures.acknowledged = figures.stored = len(acked) + 1
    finally:
        listener.stop()
