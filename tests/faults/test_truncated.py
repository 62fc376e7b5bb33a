"""Truncated and mis-declared data sets against a real `serve`: each is refused with 0xC000 and
quarantined with its reason, nothing of them reaches the spool or the ledger, the listener keeps
serving, and a valid instance sent after them is stored (issue 17, item 2).

The SCU is pynetdicom sending the files' bytes as they are (``raw_send``): a sender whose file was cut
short, or whose file meta declares another transfer syntax than its bytes use, is what the check is for.
"""
from __future__ import annotations

import json
import random
import time
from io import BytesIO
from pathlib import Path

import pytest
from conftest import FAULT_ROUNDS, Figures, write_instance
from faultlib import Proc, base_env, report_measure
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom import AE

from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.errors import MalformedInstanceError
from dicom_fusion.service.ingest.wellformed import check_part10
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Instance

pytestmark = pytest.mark.faults

ROOT = "1.2.826.0.1.3680043.8.498.72"
ROWS = 512  # 512² × 16 bit: a 0.5 MB CT slice


def _meta(ts: str, sop_uid: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop_uid
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.2"
    fp = BytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)  # type: ignore[arg-type]
    return b"\0" * 128 + b"DICM" + fp.getvalue()


def _instance(folder: Path, sop: str, ts: str = ExplicitVRLittleEndian) -> tuple[bytes, bytes]:
    """(file meta, data set) of a 0.5 MB CT instance encoded in `ts`."""
    study = sop.rsplit(".", 2)[0]
    path = write_instance(folder / f"{sop}.src.dcm", study_uid=study, series_uid=f"{study}.1", sop_uid=sop,
                          rows=ROWS)
    if ts != ExplicitVRLittleEndian:
        ds = dcmread(path)
        ds.file_meta.TransferSyntaxUID = ts
        ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    meta_end = 144 + int(dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength)
    return raw[:meta_end], raw[meta_end:]


def _bad_files(folder: Path, rnd: int, rng: random.Random) -> list[tuple[Path, str]]:
    """This round's refused files, each with what is wrong with it."""
    out: list[tuple[Path, str]] = []

    def add(name: str, data: bytes, what: str) -> None:
        p = folder / f"{name}.dcm"
        p.write_bytes(data)
        out.append((p, what))

    sop = f"{ROOT}.{rnd}.1.1"
    meta, body = _instance(folder, sop)
    pixels = body.rfind(b"\xe0\x7f\x10\x00")
    cuts = [rng.randrange(1, pixels), rng.randrange(pixels, pixels + 12),  # in the headers, in Pixel Data's
            *(rng.randrange(pixels + 12, len(body)) for _ in range(3)),   # in the pixels
            pixels, len(body) - 1]                                        # just before the pixels, 1 byte short
    for i, cut in enumerate(cuts):
        add(f"{sop}.cut{i}", meta + body[:cut], f"truncated at {cut} of {len(body)}")
    _, implicit_body = _instance(folder, f"{ROOT}.{rnd}.1.2", ImplicitVRLittleEndian)
    add(f"{ROOT}.{rnd}.1.2", _meta(ExplicitVRLittleEndian, f"{ROOT}.{rnd}.1.2") + implicit_body,
        "implicit VR bytes declared explicit")
    _, explicit_body = _instance(folder, f"{ROOT}.{rnd}.1.3")
    add(f"{ROOT}.{rnd}.1.3", _meta(ImplicitVRLittleEndian, f"{ROOT}.{rnd}.1.3") + explicit_body,
        "explicit VR bytes declared implicit")
    add(f"{ROOT}.{rnd}.1.4", _meta(JPEGBaseline8Bit, f"{ROOT}.{rnd}.1.4") + _instance(folder, f"{ROOT}.{rnd}.1.4")[1],
        "native pixels declared JPEG baseline")
    return out


def _send(port: int, files: list[Path]) -> list[int | None]:
    """One association; the status of each C-STORE (None: no answer)."""
    ae = AE(ae_title="TRUNCSCU")
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit):
        ae.add_requested_context(CTImageStorage, ts)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="DFUSION")
    assert assoc.is_established, "listener refused the association"
    statuses: list[int | None] = []
    try:
        for f in files:
            st = assoc.send_c_store(f)
            statuses.append(int(st.Status) if "Status" in st else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def test_truncated_and_misdeclared(tmp_path: Path, figures: Figures, raw_send: None,
                                   request: pytest.FixtureRequest) -> None:
    port = free_port()
    data = tmp_path / "var"
    serve = Proc(["serve", "--no-worker"], base_env(data, port), tmp_path / "serve.log", tmp_path).start(wait_port=port)
    rng = random.Random(17)
    refused = valid_ok = sent = 0
    wrong: list[str] = []
    walk_us: list[float] = []
    try:
        for rnd in range(FAULT_ROUNDS):
            folder = tmp_path / f"round{rnd}"
            folder.mkdir()
            bad = _bad_files(folder, rnd, rng)
            cut = bad[-4][0].read_bytes()  # 1 byte short: the walk goes through every header to the end
            t0 = time.perf_counter()
            for _ in range(20):
                with pytest.raises(MalformedInstanceError):
                    check_part10(cut)
            walk_us.append((time.perf_counter() - t0) / 20 * 1e6)
            statuses = _send(port, [p for p, _ in bad])
            sent += len(bad)
            for (p, what), st in zip(bad, statuses, strict=True):
                if st == 0xC000:
                    refused += 1
                else:
                    wrong.append(f"{what}: {st if st is None else hex(st)}")
            assert serve.alive
            good_sop = f"{ROOT}.{rnd}.2.1"
            good = write_instance(folder / f"{good_sop}.dcm", study_uid=f"{ROOT}.{rnd}.2",
                                  series_uid=f"{ROOT}.{rnd}.2.1", sop_uid=good_sop, rows=ROWS)
            [st] = _send(port, [good])
            sent += 1
            valid_ok += int(st == 0x0000)
        quarantine = data / "spool" / "quarantine"
        reasons = [json.loads(p.read_text())["reason"] for p in sorted(quarantine.glob("*.json"))]
        ledger = Ledger(f"sqlite:///{data / 'ledger.sqlite'}")
        with ledger.session() as s:
            stored = {r.sop_uid for r in s.query(Instance)}
        ledger.close()
        spooled = [p for p in (data / "spool" / "studies").rglob("*") if p.is_file()]
        figures.rounds, figures.sent = FAULT_ROUNDS, sent
        figures.acknowledged = valid_ok
        figures.stored = len(stored)
        figures.lost = valid_ok - len(stored & {f"{ROOT}.{r}.2.1" for r in range(FAULT_ROUNDS)})
        figures.crashes = int(not serve.alive)
        walked = sum(1 for r in reasons if "not well-formed" in r)
        report_measure(request.config, "truncated",
                       f"{refused}/{sent - FAULT_ROUNDS} truncated or mis-declared instances refused with "
                       f"0xC000, {len(reasons)} quarantined; valid instance after each round stored "
                       f"{valid_ok}/{FAULT_ROUNDS}; walk of a cut 0.5 MB instance "
                       f"{sum(walk_us) / len(walk_us):.0f} µs; {walked} refused by the walk, "
                       f"{len(reasons) - walked} by the filing-UID check (cut before the UIDs)")
        assert wrong == [], wrong
        assert len(reasons) == refused
        assert all(r for r in reasons)
        assert valid_ok == FAULT_ROUNDS
        assert stored == {f"{ROOT}.{r}.2.1" for r in range(FAULT_ROUNDS)}, "only the valid instances are stored"
        assert len(spooled) == FAULT_ROUNDS
        assert serve.alive
    finally:
        serve.stop()
