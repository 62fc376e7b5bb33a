"""Shared fixtures: real components on free loopback ports, stopped by PID.

A missing component skips the test on a developer machine and fails it when ``CI=true``: CI must
never turn green by skipping the integration suite.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from dicom_fusion.service.demo import components

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parents[1]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM (a `serve` drains and stops its children), then SIGKILL after `timeout` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def require(available: bool, what: str) -> None:
    """Skip locally, fail in CI, when a real component is missing."""
    if available:
        return
    msg = f"{what} is not installed; run `make sysdeps` (scripts/install-system-deps.sh)"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def require_tool(path_or_name: str) -> str:
    found = path_or_name if Path(path_or_name).is_absolute() and Path(path_or_name).exists() \
        else shutil.which(path_or_name)
    require(found is not None, path_or_name)
    assert found is not None
    return found


@pytest.fixture(scope="module")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[components.FhirServer]:
    require(components.sekmet_executable() is not None, "sekmet-fhir (pip extra [dev])")
    server = components.start_fhir_server(tmp_path_factory.mktemp("fhir"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[components.Pacs]:
    require(components.orthanc_executable() is not None, "Orthanc (Debian package orthanc)")
    pacs = components.start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield pacs
    pacs.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[components.RedisServer]:
    require(shutil.which("redis-server") is not None, "redis-server (Debian package redis-server)")
    server = components.start_redis(tmp_path / "redis")
    yield server
    server.stop()


def _psycopg_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("psycopg") is not None


@pytest.fixture
def postgres_server(tmp_path: Path) -> Iterator[components.PostgresServer]:
    """A private PostgreSQL cluster (initdb, postmaster on a free loopback port; as root it runs as the
    `postgres` OS user) with an empty database `dfusion`; stopped by PID and removed afterwards."""
    require(components.postgres_bindir() is not None, "PostgreSQL (Debian package postgresql)")
    require(_psycopg_installed(), "psycopg (pip extra [dev] or [postgres])")
    server = components.start_postgres(tmp_path / "postgres")
    yield server
    server.destroy()


def migrate_ledger(url: str) -> None:
    """`dicom-fusion db upgrade` against `url`, as an operator runs it before starting the processes."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_FUSION_")}
    env["DICOM_FUSION_LEDGER__URL"] = url
    res = subprocess.run([sys.executable, "-m", "dicom_fusion.service.cli", "db", "upgrade"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"db upgrade failed: {res.stdout}{res.stderr}"


@pytest.fixture
def postgres_ledger(postgres_server: components.PostgresServer) -> str:
    """The SQLAlchemy URL of a PostgreSQL ledger migrated to this release's schema."""
    migrate_ledger(postgres_server.url)
    return postgres_server.url


@pytest.fixture
def storescu() -> str:
    """DCMTK's storescu by absolute path: the venv's pynetdicom `storescu` shadows it on PATH."""
    return require_tool("/usr/bin/storescu")


@pytest.fixture
def dciodvfy() -> str:
    return require_tool("dciodvfy")


def write_instance(path: Path, *, study_uid: str, series_uid: str, sop_uid: str, rows: int = 64,
                   patient_id: str = "TEST0001", modality: str = "DX") -> Path:
    """A small image (explicit VR little endian) for listener and pipeline tests. Its SOP class is CT
    Image Storage (the presentation context the listener tests negotiate); its Modality is DX unless
    given, so the default route's model (DX, CR) reads it and a job runs."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    sop_class = CTImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "TEST^PATIENT", patient_id, "19700101"
    ds.Modality, ds.StudyDate, ds.StudyTime = modality, "20260101", "120000"
    ds.AccessionNumber, ds.InstanceNumber, ds.SeriesNumber = "ACC1", 1, 1
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(rows * rows, dtype=np.uint16) % 4096).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ---- fault-injection figures (tests/faults): one table printed at the end of the run ----------

FAULT_ROUNDS = int(os.environ.get("FAULT_ROUNDS", "3"))  # `make faults`: 20


@dataclass
class Figures:
    fault: str
    rounds: int = 0
    sent: int = 0
    acknowledged: int = 0
    stored: int = 0
    lost: int = 0
    duplicates: int = 0
    crashes: int = 0
    # hostile-peer scenarios (test_hostile_peers.py): how the study ended, seconds from sending it to a
    # terminal job state, the worker's peak RSS meanwhile, patient-data hits where none may be
    outcome: str = ""
    settle_s: float | None = None
    rss_mb: int | None = None
    phi_hits: int | None = None
    # restarts in the production topology (test_topology_restarts.py): the longest time, over the rounds,
    # from the kill -9 until every study of the round had its SR and report
    recover_s: float | None = None


_TABLE: list[Figures] = []
_EXTRA = ("outcome", "settle_s", "rss_mb", "phi_hits", "recover_s")  # printed only when some row has them


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    f = Figures(fault=request.node.name.removeprefix("test_"))
    _TABLE.append(f)
    return f


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TABLE:
        return
    cols = [f.name for f in fields(Figures)
            if f.name not in _EXTRA or any(getattr(row, f.name) not in ("", None) for row in _TABLE)]
    width = max(len(f.fault) for f in _TABLE) + 2
    widths = {c: max(13, 2 + max(len(str(getattr(row, c))) for row in _TABLE)) for c in cols[1:]}

    def cell(row: Figures, c: str) -> str:
        value = getattr(row, c)
        return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)

    terminalreporter.section("fault-injection figures")
    terminalreporter.write_line(f"{'fault':<{width}}" + "".join(f"{c:>{widths[c]}}" for c in cols[1:]))
    for f in _TABLE:
        terminalreporter.write_line(f"{f.fault:<{width}}" + "".join(f"{cell(f, c):>{widths[c]}}" for c in cols[1:]))


@pytest.fixture
def raw_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom SCUs send files' bytes as they are (no decode/re-encode) for this test only."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
