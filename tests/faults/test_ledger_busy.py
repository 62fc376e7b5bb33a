"""Ledger busy: another process holds the SQLite write lock while instances arrive. C-STORE waits
(busy timeout) instead of acknowledging early; when the lock is released every instance is recorded,
none is lost or doubled."""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from conftest import Figures, write_instance
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_fusion.service.config import ListenerSettings
from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.ingest.listener import Listener
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Instance
from dicom_fusion.service.storage.spool import Spool

pytestmark = pytest.mark.faults


def test_ledger_busy(tmp_path: Path, figures: Figures) -> None:
    db = tmp_path / "l.sqlite"
    ledger = Ledger(f"sqlite:///{db}")
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    listener = Listener(ListenerSettings(host="127.0.0.1", port=free_port()), spool, ledger)
    listener.start()
    blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # the ledger is busy (a long migration, a backup, another writer)
        released_at: list[float] = []

        def release_later() -> None:
            time.sleep(2.0)
            released_at.append(time.monotonic())
            blocker.execute("COMMIT")

        threading.Thread(target=release_later, daemon=True).start()
        ae = AE(ae_title="BUSYTEST")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", listener.settings.port, ae_title="DFUSION")
        assert assoc.is_established
        statuses, acked_at = [], []
        for i in range(5):
            sop = f"1.2.826.0.1.3680043.8.498.44.1.{i + 1}"
            f = write_instance(tmp_path / "in" / f"{sop}.dcm", study_uid="1.2.826.0.1.3680043.8.498.44",
                               series_uid="1.2.826.0.1.3680043.8.498.44.1", sop_uid=sop)
            statuses.append(int(assoc.send_c_store(f).Status))
            acked_at.append(time.monotonic())
        assoc.release()
        assert statuses == [0] * 5
        assert acked_at[0] >= released_at[0], "an instance was acknowledged while the ledger was locked"
        with ledger.session() as s:
            rows = [r.sop_uid for r in s.query(Instance)]
        assert len(rows) == len(set(rows)) == 5
        figures.rounds, figures.sent, figures.acknowledged, figures.stored = 1, 5, 5, len(rows)
    finally:
        listener.stop()
        blocker.close()
