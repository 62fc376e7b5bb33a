"""Helpers of the fault suite: run `dicom-fusion serve`/`worker` as real processes, send with real
SCUs, and check the spool/ledger invariants after a fault."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import write_instance
from pdus import association_rq
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


# ---- port scans and figures beyond the table (test_port_scan.py) ---------------------------------

_MEASURES: list[str] = []


class _MeasuresReport:
    """Prints the measured figures (times, memory) of the fault tests after the figures table."""

    def pytest_terminal_summary(self, terminalreporter: object) -> None:
        if _MEASURES:
            terminalreporter.section("fault-injection measurements")  # type: ignore[attr-defined]
            for line in _MEASURES:
                terminalreporter.write_line(line)  # type: ignore[attr-defined]


def report_measure(config: object, fault: str, text: str) -> None:
    """Add one line (``fault: text``) to the measurements section `make faults` prints at the end."""
    manager = config.pluginmanager  # type: ignore[attr-defined]
    if not manager.has_plugin("faultlib-measures"):
        manager.register(_MeasuresReport(), "faultlib-measures")
    _MEASURES.append(f"{fault}: {text}")
    print(f"{fault}: {text}")


def rss_kb(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


SCAN_KINDS = ("connect-close", "junk", "truncated-header", "header-then-silence")


def scan_connection(port: int, kind: str, rng: random.Random, source: str = "127.0.0.1") -> None:
    """One port-scanner connection of `kind` (SCAN_KINDS), closed by us at the end; a connection the
    listener refuses or closes first is part of the game."""
    rq = association_rq()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        if kind == "junk":
            junk = rng.choice([b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
                               b"SSH-2.0-OpenSSH_9.6\r\n", bytes([0x01, 0, 0, 0, 0, 68]) + os.urandom(68),
                               b"\xff" + os.urandom(rng.randint(1, 63))])
            s.sendall(junk)
        elif kind == "truncated-header":
            s.sendall(rq[: rng.randint(1, 5)] if rng.random() < 0.5 else rq[: rng.randint(7, len(rq) - 1)])
        elif kind == "header-then-silence":
            s.sendall(rq[:6])
            time.sleep(rng.uniform(0.0, 0.2))
    except OSError:
        pass
    finally:
        s.close()


def scan_burst(port: int, connections: int, clients: int, source: str = "127.0.0.1", seed: int = 0) -> float:
    """`connections` scanner connections (SCAN_KINDS in turn) from `clients` parallel threads bound to
    `source`; returns the seconds the burst took."""
    todo = list(range(connections))
    lock = threading.Lock()

    def client(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            scan_connection(port, SCAN_KINDS[i % len(SCAN_KINDS)], rng, source)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return time.monotonic() - t0


def echo_from(port: int, source: str = "127.0.0.1", timeout: float = 5) -> bool:
    """One C-ECHO on a fresh association from `source`; False when refused, rejected or timed out."""
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DFUSION", bind_address=(source, 0))
    except Exception:
        return False
    if not assoc.is_established:
        return False
    try:
        ok = "Status" in (st := assoc.send_c_echo()) and st.Status == 0
    finally:
        assoc.release()
    return bool(ok)


# ---- processes left behind (test_listener_kill.py) -------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name (field 3 onwards), None when the pid is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of `pid`, as pid -> start time (so a reused pid is not taken for it)."""
    parents: dict[int, tuple[int, str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat.parent.name))
        if fields is not None and fields[0] not in ("Z", "X"):
            parents[int(stat.parent.name)] = (int(fields[1]), fields[19])
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        for child, (ppid, start) in parents.items():
            if ppid == p and child not in found:
                found[child] = start
                todo.append(child)
    return found


def still_running(procs: dict[int, str]) -> list[int]:
    """The processes of a `descendants` snapshot that still run (same pid, same start time, not a zombie)."""
    alive = []
    for pid, start in procs.items():
        fields = _stat(pid)
        if fields is not None and fields[0] not in ("Z", "X") and fields[19] == start:
            alive.append(pid)
    return alive
