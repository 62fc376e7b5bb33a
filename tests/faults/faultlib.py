"""Helpers of the fault suite: run `dicom-fusion serve`/`worker` as real processes, send with real
SCUs, and check the spool/ledger invariants after a fault."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import write_instance
from pydicom import dcmread
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from dicom_fusion.service.server import wait_for_port
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Instance

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def base_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DICOM_FUSION_CONFIG", None)
    env.update({
        "DICOM_FUSION_DATA_DIR": str(data_dir),
        "DICOM_FUSION_LISTENER__PORT": str(port),
        "DICOM_FUSION_COMPLETION__QUIET_SECONDS": "0.5",
        "DICOM_FUSION_WORKER__REAPER_INTERVAL_SECONDS": "0.5",
    })
    env.update(extra)
    return env


@dataclass
class Proc:
    """A dicom-fusion process started with `python -m dicom_fusion.service.cli ...`."""

    args: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_port: int | None = None) -> Proc:
        fh = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", *self.args],
                                     env=self.env, stdout=fh, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     start_new_session=True)
        if wait_port:
            wait_for_port("127.0.0.1", wait_port, timeout=60)
        return self

    def kill9(self) -> None:
        """SIGKILL the process *group*: serve's embedded worker dies with it, as on a node failure."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def body_bytes(path: Path) -> bytes:
    """The dataset bytes after the file meta information (what travels in the C-STORE)."""
    raw = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    meta_len = int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[132 + 12 + meta_len:]


@dataclass
class SendLog:
    acked: dict[str, int] = field(default_factory=dict)  # sop uid -> status
    attempted: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def success(self) -> set[str]:
        return {uid for uid, st in self.acked.items() if st == 0x0000}


def send_files(port: int, files: list[Path], log: SendLog, calling: str = "FAULTSCU") -> None:
    """One association sending raw file bytes (no re-encoding); stops quietly when the peer dies.

    The caller sets ``pynetdicom._config.STORE_SEND_CHUNKED_DATASET`` (fixture ``raw_send``).
    """
    assert _config.STORE_SEND_CHUNKED_DATASET, "use the raw_send fixture"
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DFUSION")
    except Exception:
        return
    if not assoc.is_established:
        return
    try:
        for f in files:
            uid = f.stem
            with log.lock:
                log.attempted += 1
            try:
                st = assoc.send_c_store(f)
            except Exception:
                break
            if not assoc.is_established or "Status" not in st:
                break
            with log.lock:
                log.acked[uid] = int(st.Status)
        if assoc.is_established:
            assoc.release()
    except Exception:
        pass


def study_batches(folder: Path, study_prefix: str, associations: int,
                  per: int) -> tuple[list[list[Path]], dict[str, Path]]:
    """`associations` studies of `per` 128-row CT instances written under `folder/in`, one batch (one
    association) per study, UIDs `{study_prefix}.{a}` / `.1.{i}`; also SOP Instance UID -> source file."""
    sources: dict[str, Path] = {}
    batches = []
    for a in range(associations):
        study = f"{study_prefix}.{a + 1}"
        batch = []
        for i in range(per):
            sop = f"{study}.1.{i + 1}"
            sources[sop] = write_instance(folder / "in" / f"{sop}.dcm", study_uid=study,
                                          series_uid=f"{study}.1", sop_uid=sop, rows=128)
            batch.append(sources[sop])
        batches.append(batch)
    return batches, sources


def parallel_send(port: int, batches: list[list[Path]], log: SendLog) -> list[threading.Thread]:
    threads = [threading.Thread(target=send_files, args=(port, b, log), daemon=True) for b in batches]
    for t in threads:
        t.start()
    return threads


def verify_spool(ledger: Ledger, sources: dict[str, Path]) -> tuple[int, list[str]]:
    """Every ledger row points to a complete file whose hash and body equal the source's bytes.

    Returns (rows, problems).
    """
    problems = []
    with ledger.session() as s:
        rows = list(s.query(Instance))
    for r in rows:
        p = Path(r.path)
        if p.name.startswith(".tmp-") or not p.exists():
            problems.append(f"{r.sop_uid}: file missing or temporary")
            continue
        data = p.read_bytes()
        if hashlib.sha256(data).hexdigest() != r.sha256 or len(data) != r.size:
            problems.append(f"{r.sop_uid}: stored bytes do not match the ledger's hash")
        src = sources.get(r.sop_uid)
        if src is not None and body_bytes(p) != body_bytes(src):
            problems.append(f"{r.sop_uid}: stored dataset differs from what was sent")
    return len(rows), problems


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
