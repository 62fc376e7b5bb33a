"""Malformed and hostile input: fuzzed datasets, raw garbage, idle (slowloris) connections, too many
associations, and decodable-but-odd images. Each gets a failure status / rejection and, where the
dataset is kept, a quarantine file with a reason; the listener never crashes and memory stays bounded."""
from __future__ import annotations

import os
import random
import socket
import struct
import time
from pathlib import Path

import pytest
from conftest import FAULT_ROUNDS, Figures, write_instance
from faultlib import Proc, base_env, wait_until
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import JobState

pytestmark = pytest.mark.faults

ALLOWED = {0x0000, 0xA700, 0xA900, 0xC000}
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _echo(port: int) -> bool:
    ae = AE(ae_title="ECHO")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DFUSION")
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return bool(ok)


def _mutations(good: Path, out: Path, n: int, rng: random.Random) -> list[Path]:
    """Mutants of a valid file: the file meta stays valid (the SCU needs it), the dataset does not."""
    raw = good.read_bytes()
    meta_len = int(dcmread(good, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength)
    head, body = raw[: 144 + meta_len], bytearray(raw[144 + meta_len:])
    files = []
    for i in range(n):
        b = bytearray(body)
        kind = i % 5
        if kind == 0:  # truncation
            b = b[: rng.randint(0, len(b) - 1)]
        elif kind == 1:  # random byte flips in the header region
            for _ in range(rng.randint(1, 20)):
                b[rng.randint(0, min(len(b) - 1, 400))] = rng.randint(0, 255)
        elif kind == 2:  # absurd length field on a random element header
            pos = rng.randrange(0, min(len(b) - 8, 400))
            b[pos + 6:pos + 8] = b"\xf0\xff"
        elif kind == 3:  # wrong VR bytes
            pos = rng.randrange(0, min(len(b) - 8, 400))
            b[pos + 4:pos + 6] = rng.choice([b"SQ", b"OB", b"UN", b"ZZ", b"\x00\x00"])
        else:  # garbage appended / prepended
            b = bytearray(os.urandom(rng.randint(1, 64))) + b if rng.random() < 0.5 else b + os.urandom(64)
        p = out / f"mutant-{i}.dcm"
        p.write_bytes(head + bytes(b))
        files.append(p)
    return files


def _odd_files(tmp: Path) -> list[Path]:
    """Valid headers with hostile content: deep sequences, huge element, absurd Rows/Columns."""
    out = []
    deep = write_instance(tmp / "deep.dcm", study_uid="1.2.826.0.1.3680043.8.498.66.1", series_uid="1.2.826.0.1.3680043.8.498.66.1.1",
                          sop_uid="1.2.826.0.1.3680043.8.498.66.1.1.1")
    ds = dcmread(deep)
    del ds.PixelData  # so the deep sequence (0040,A730) can follow as the last element
    ds.save_as(deep, enforce_file_format=True)
    # 1000 nested undefined-length sequences, written by hand (pydicom's writer cannot produce them)
    opening = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    deep.write_bytes(deep.read_bytes() + opening * 1000 + closing * 1000)
    out.append(deep)
    huge = write_instance(tmp / "huge.dcm", study_uid="1.2.826.0.1.3680043.8.498.66.2", series_uid="1.2.826.0.1.3680043.8.498.66.2.1",
                          sop_uid="1.2.826.0.1.3680043.8.498.66.2.1.1")
    ds = dcmread(huge)
    ds.add_new(0x00091010, "OB", b"\0" * (16 * 1024 * 1024))
    ds.save_as(huge, enforce_file_format=True)
    out.append(huge)
    return out


def _send_raw(port: int, files: list[Path]) -> list[int | None]:
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
    statuses: list[int | None] = []
    assoc = None
    for f in files:
        if assoc is None or not assoc.is_established:
            assoc = ae.associate("127.0.0.1", port, ae_title="DFUSION")
            assert assoc.is_established, "listener stopped accepting associations"
        try:
            st = assoc.send_c_store(f)
            statuses.append(int(st.Status) if "Status" in st else None)
        except Exception:
            statuses.append(None)
    if assoc is not None and assoc.is_established:
        assoc.release()
    return statuses


def test_fuzzed_and_hostile_input(tmp_path: Path, figures: Figures, raw_send: None) -> None:
    port = free_port()
    env = base_env(tmp_path / "var", port, DICOM_FUSION_LISTENER__ACSE_TIMEOUT="2",
                   DICOM_FUSION_LISTENER__NETWORK_TIMEOUT="3", DICOM_FUSION_LISTENER__MAX_ASSOCIATIONS="3")
    serve = Proc(["serve", "--no-worker"], env, tmp_path / "serve.log", tmp_path).start(wait_port=port)
    assert serve.proc is not None
    try:
        good = write_instance(tmp_path / "good.dcm", study_uid="1.2.826.0.1.3680043.8.498.66",
                              series_uid="1.2.826.0.1.3680043.8.498.66.9", sop_uid="1.2.826.0.1.3680043.8.498.66.9.1")
        mutants = _mutations(good, tmp_path, FAULT_ROUNDS * 10, random.Random(7))
        rss_before = _rss_kb(serve.proc.pid)
        statuses = _send_raw(port, mutants + _odd_files(tmp_path))
        unexpected = [s for s in statuses if s is not None and s not in ALLOWED]
        assert unexpected == []
        failures = sum(1 for s in statuses if s not in (0x0000, None))
        quarantined = list((tmp_path / "var" / "spool" / "quarantine").glob("*.json"))
        assert len(quarantined) == failures
        assert all("reason" in q.read_text() for q in quarantined)
        # raw garbage on the port, then idle connections that never speak (slowloris)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(os.urandom(65536))
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        t0 = time.monotonic()
        for s in idle:
            s.settimeout(15)
            try:
                assert s.recv(1024) == b""  # the listener closes an association that never opens
            except ConnectionResetError:
                pass
            s.close()
        assert time.monotonic() - t0 < 15
        # more associations than the limit: the extra one is rejected, the listener keeps serving
        held = []
        for _ in range(3):
            ae = AE(ae_title="HOLDER")
            ae.add_requested_context(Verification)
            held.append(ae.associate("127.0.0.1", port, ae_title="DFUSION"))
        assert all(a.is_established for a in held)
        extra = AE(ae_title="EXTRA")
        extra.add_requested_context(Verification)
        over = extra.associate("127.0.0.1", port, ae_title="DFUSION")
        assert not over.is_established
        for a in held:
            a.release()
        wait_until(lambda: _echo(port), 10, "listener serving after the limit test")
        assert serve.alive
        growth_mb = (_rss_kb(serve.proc.pid) - rss_before) / 1024
        assert growth_mb < 100, f"listener RSS grew {growth_mb:.0f} MB"
        figures.rounds = FAULT_ROUNDS
        figures.sent = len(statuses) + 4
        figures.acknowledged = sum(1 for s in statuses if s == 0)
        figures.stored = figures.acknowledged
        figures.crashes = int(not serve.alive)
    finally:
        serve.stop()


def test_decodable_but_odd_image_fails_job_with_reason(tmp_path: Path, storescu: str) -> None:
    import subprocess

    port = free_port()
    serve = Proc(["serve"], base_env(tmp_path / "var", port), tmp_path / "serve.log", tmp_path).start(wait_port=port)
    try:
        study = "1.2.826.0.1.3680043.8.498.67"
        f = write_instance(tmp_path / "odd.dcm", study_uid=study, series_uid=study + ".1", sop_uid=study + ".1.1")
        ds = dcmread(f)
        ds.Rows = ds.Columns = 4096  # header promises 32 MB of pixels, the data holds 8 KB
        ds.save_as(f, enforce_file_format=True)
        subprocess.run([storescu, "-aec", "DFUSION", "127.0.0.1", str(port), str(f)], check=True, capture_output=True)
        ledger = Ledger(f"sqlite:///{tmp_path / 'var' / 'ledger.sqlite'}")
        wait_until(lambda: any(j.state in (JobState.DEAD, JobState.DONE) for j in ledger.jobs_for_study(study)),
                   90, "odd image job to finish")
        [job] = ledger.jobs_for_study(study)
        assert job.state == JobState.DEAD
        assert job.error and job.error.startswith("prepare:"), job.error
        assert serve.alive
    finally:
        serve.stop()
