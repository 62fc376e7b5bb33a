"""The listener against real senders (DCMTK storescu, pynetdicom SCU) on loopback."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_instance
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_fusion.service.config import ListenerSettings
from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.ingest.listener import Listener
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Instance
from dicom_fusion.service.storage.spool import Spool

pytestmark = pytest.mark.integration


class Running:
    def __init__(self, tmp: Path, **listener: object) -> None:
        self.spool = Spool(tmp / "spool")
        self.spool.ensure()
        self.ledger = Ledger(f"sqlite:///{tmp / 'ledger.sqlite'}")
        self.released: list[set[str]] = []
        self.settings = ListenerSettings(host="127.0.0.1", port=free_port(), **listener)
        self.listener = Listener(self.settings, self.spool, self.ledger, on_release=self.released.append)
        self.host, self.port = self.listener.start()

    def instances(self) -> list[Instance]:
        with self.ledger.session() as s:
            return list(s.query(Instance).order_by(Instance.id))


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path)
    yield r
    r.listener.stop()


def _send(port: int, ds_or_path: object, calling: str = "TESTSCU", contexts: list[tuple[str, str]] | None = None) -> int:
    ae = AE(ae_title=calling)
    if contexts:
        for sop, ts in contexts:
            ae.add_requested_context(sop, ts)
    else:
        ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DFUSION")
    assert assoc.is_established, "association not established"
    status = assoc.send_c_store(ds_or_path)
    assoc.release()
    return int(status.Status)


def test_echo(scp: Running) -> None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="DFUSION")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_storescu_study_is_durable_and_acknowledged(scp: Running, tmp_path: Path, storescu: str) -> None:
    files = [write_instance(tmp_path / "in" / f"{i}.dcm", study_uid="1.2.826.0.1.1", series_uid="1.2.826.0.1.1.1",
                            sop_uid=f"1.2.826.0.1.1.1.{i}") for i in range(1, 4)]
    env = dict(os.environ, TCP_NODELAY="1")
    subprocess.run([storescu, "-aet", "PACS1", "-aec", "DFUSION", "127.0.0.1", str(scp.port), *map(str, files)],
                   check=True, env=env, capture_output=True)
    rows = scp.instances()
    assert [r.sop_uid for r in rows] == [f"1.2.826.0.1.1.1.{i}" for i in range(1, 4)]
    for f, row in zip(files, rows, strict=True):
        stored = dcmread(row.path)
        assert stored.SOPInstanceUID == dcmread(f).SOPInstanceUID
        assert stored.PixelData == dcmread(f).PixelData
        assert Path(row.path).stat().st_size == row.size
    assert scp.released == [{"1.2.826.0.1.1"}]


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "MR_small_bigendian.dcm", "image_dfl.dcm", "MR_small_implicit.dcm"])
def test_compressed_and_other_syntaxes_stored_as_received(scp: Running, name: str) -> None:
    path = get_testdata_file(name)
    src = dcmread(path)
    ts = str(src.file_meta.TransferSyntaxUID)
    status = _send(scp.port, path, contexts=[(str(src.SOPClassUID), ts)])
    assert status == 0x0000
    [row] = scp.instances()
    assert row.transfer_syntax == ts
    stored = dcmread(row.path)
    assert str(stored.file_meta.TransferSyntaxUID) == ts
    assert stored.SOPInstanceUID == src.SOPInstanceUID


def test_duplicate_sop_instance_kept_once(scp: Running, tmp_path: Path) -> None:
    f = write_instance(tmp_path / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    assert _send(scp.port, f) == 0
    assert _send(scp.port, f) == 0
    assert len(scp.instances()) == 1


def test_malformed_gets_failure_and_quarantine_then_valid_works(scp: Running, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    good = write_instance(tmp_path / "good.dcm", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    bad = tmp_path / "bad.dcm"
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = DicomBytesIO()
    write_file_meta_info(meta, dcmread(good).file_meta)  # valid meta, then a body that is not DICOM
    bad.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + b"\x08\x00\x16\x00UI\xff\x7fgarbage" * 50)
    ds = dcmread(good)
    no_study = tmp_path / "nostudy.dcm"
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.6"
    ds.save_as(no_study, enforce_file_format=True)
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the raw bytes, undecoded
    assert _send(scp.port, bad, contexts=[(CTImageStorage, "1.2.840.10008.1.2.1")]) == 0xC000
    monkeypatch.undo()
    assert _send(scp.port, no_study) == 0xC000
    quarantined = sorted(scp.spool.quarantine_dir.glob("*.json"))
    assert len(quarantined) == 2
    assert "StudyInstanceUID is missing" in "".join(q.read_text() for q in quarantined)
    assert _send(scp.port, good) == 0x0000
    assert [r.sop_uid for r in scp.instances()] == ["1.2.3.4.5"]


def test_unknown_calling_ae_rejected(tmp_path: Path) -> None:
    r = Running(tmp_path, allowed_calling_aes=["PACS1"])
    try:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", r.port, ae_title="DFUSION")
        assert assoc.is_rejected
        ae2 = AE(ae_title="PACS1")
        ae2.add_requested_context(CTImageStorage)
        assoc2 = ae2.associate("127.0.0.1", r.port, ae_title="DFUSION")
        assert assoc2.is_established
        assoc2.release()
    finally:
        r.listener.stop()


def test_unwritable_spool_answers_out_of_resources(scp: Running, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from dicom_fusion.service.storage import spool as spool_mod

    def no_space(*a: object, **k: object) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    f = write_instance(tmp_path / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    monkeypatch.setattr(spool_mod, "write_temp", no_space)
    assert _send(scp.port, f) == 0xA700
    assert scp.instances() == []
    monkeypatch.undo()
    assert _send(scp.port, f) == 0x0000
