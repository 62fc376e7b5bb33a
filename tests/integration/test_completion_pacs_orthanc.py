"""Study completeness from what the PACS knows (`completion.mode = "pacs"`), against a real Orthanc.

The study is stored in Orthanc first (it is "the PACS that knows": it answers C-FIND with
NumberOfStudyRelatedInstances / NumberOfSeriesRelatedInstances), then sent to `dicom-fusion serve`.
Timings come from the ledger: the last instance's `received_at` against the job's `created_at`.
`serve` runs without its worker: these tests are about when a job starts, not what it computes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import stop_process, write_instance
from sqlalchemy import func, select

from dicom_fusion.service.demo.components import Pacs, free_port
from dicom_fusion.service.server import wait_for_port
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Instance, Job, Study

pytestmark = pytest.mark.integration
PHI = ("TEST^PATIENT", "PACSCOMP")  # write_instance's name, our PatientIDs: never in the logs
SETTLE = 2.0


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    ledger: Ledger

    def send(self, storescu: str, files: list[Path]) -> None:
        _storescu(storescu, "DFUSION", self.port, files)

    def jobs(self, study_uid: str) -> list[Job]:
        return sorted(self.ledger.jobs_for_study(study_uid), key=lambda j: j.version)

    def wait_jobs(self, study_uid: str, n: int, timeout: float) -> list[Job]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs(study_uid)
            if len(jobs) >= n:
                return jobs
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited early:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{n} job(s) for the study not created in {timeout} s; have {self.jobs(study_uid)}\n"
                             f"{self.log.read_text()[-3000:]}")

    def start_delay(self, job: Job) -> float:
        """Seconds from the last instance of the job's study (as the ledger recorded it) to the job."""
        with self.ledger.session() as s:
            last = s.scalar(select(func.max(Instance.received_at)).where(Instance.study_id == job.study_id))
        assert last is not None
        return (job.created_at - last).total_seconds()

    def completion_note(self, job: Job) -> str:
        details = [e.detail or "" for e in self.ledger.audit_events("job", job.id) if e.event == "complete"]
        assert len(details) == 1, details
        return details[0]


@contextmanager
def _serve(tmp_path: Path, pacs_port: int, pacs_ae: str, env_extra: dict[str, str]) -> Iterator[Serve]:
    """`dicom-fusion serve --no-worker` on a free port (as tests/e2e/test_spine.running_serve, without the
    worker), its `[pacs]` node at `pacs_port`; stopped with SIGTERM."""
    port, data = free_port(), tmp_path / "var"
    env = dict(os.environ)
    env.pop("DICOM_FUSION_CONFIG", None)
    env.update({
        "DICOM_FUSION_DATA_DIR": str(data),
        "DICOM_FUSION_LISTENER__PORT": str(port),
        "DICOM_FUSION_PACS__AE_TITLE": pacs_ae,
        "DICOM_FUSION_PACS__PORT": str(pacs_port),
        "DICOM_FUSION_COMPLETION__POLL_SECONDS": "0.2",
        **env_extra,
    })
    log = tmp_path / "serve.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "serve", "--no-worker"],
                                env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        yield Serve(proc, port, log, Ledger(f"sqlite:///{data / 'ledger.sqlite'}"))
    finally:
        stop_process(proc)


def _storescu(storescu: str, called_ae: str, port: int, files: list[Path]) -> None:
    subprocess.run([storescu, "-aet", "MODALITY", "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
                   check=True, capture_output=True, env=dict(os.environ, TCP_NODELAY="1"))


def _study(tmp_path: Path, name: str, per_series: tuple[int, ...]) -> tuple[str, list[list[Path]]]:
    """A study of len(per_series) series with that many small DX instances each; its UID and files by series."""
    study = f"1.2.826.0.1.3680043.8.498.4242.{abs(hash(name)) % 10**9}.{int(time.time() * 1000) % 10**9}"
    series = []
    for s, n in enumerate(per_series, 1):
        series.append([write_instance(tmp_path / name / f"{s}-{i}.dcm", study_uid=study, series_uid=f"{study}.{s}",
                                      sop_uid=f"{study}.{s}.{i}", rows=16, patient_id="PACSCOMP")
                       for i in range(1, n + 1)])
    return study, series


def _logged_once_without_phi(log: Path, line: str) -> None:
    """The fallback is logged once per study, naming the ledger's study id and never a patient value."""
    text = log.read_text()
    assert text.count(line) == 1
    for phi in PHI:
        assert phi not in text


def _in_orthanc(storescu: str, orthanc: Pacs, files: list[Path]) -> None:
    _storescu(storescu, orthanc.ae_title, orthanc.dicom_port, files)


@pytest.fixture(scope="module")
def pacs_serve(tmp_path_factory: pytest.TempPathFactory, orthanc: Pacs) -> Iterator[Serve]:
    # quiet period 30 s: in these tests it never decides unless the PACS does not know the study
    with _serve(tmp_path_factory.mktemp("pacs-serve"), orthanc.dicom_port, orthanc.ae_title, {
            "DICOM_FUSION_COMPLETION__MODE": "pacs",
            "DICOM_FUSION_COMPLETION__QUIET_SECONDS": "4",
            "DICOM_FUSION_COMPLETION__SETTLE_SECONDS": str(SETTLE),
            "DICOM_FUSION_COMPLETION__MAX_WAIT_SECONDS": "60"}) as serve:
        yield serve


def test_pacs_mode_starts_the_job_once_the_counts_match(pacs_serve: Serve, orthanc: Pacs, storescu: str,
                                                        tmp_path: Path) -> None:
    study, series = _study(tmp_path, "match", (3, 2))
    _in_orthanc(storescu, orthanc, series[0] + series[1])
    pacs_serve.send(storescu, series[0] + series[1])
    [job] = pacs_serve.wait_jobs(study, 1, timeout=20)
    assert "completion: pacs counts 5/5" in pacs_serve.completion_note(job)
    assert job.instance_count == 5
    delay = pacs_serve.start_delay(job)
    print(f"completeness: pacs mode, counts matched: job started {delay:.2f} s after the last instance "
          f"(settle {SETTLE:g} s)")
    assert SETTLE <= delay <= SETTLE + 1.0, delay


def test_pacs_mode_keeps_a_split_study_whole(pacs_serve: Serve, orthanc: Pacs, storescu: str,
                                             tmp_path: Path) -> None:
    study, series = _study(tmp_path, "split-pacs", (3, 2))
    _in_orthanc(storescu, orthanc, series[0] + series[1])
    pacs_serve.send(storescu, series[0])
    time.sleep(5)  # longer than this serve's quiet period (4 s): the counts, not a timer, decide
    assert pacs_serve.jobs(study) == []
    pacs_serve.send(storescu, series[1])
    [job] = pacs_serve.wait_jobs(study, 1, timeout=20)
    assert job.instance_count == 5
    assert "completion: pacs counts 5/5" in pacs_serve.completion_note(job)
    time.sleep(1)
    assert len(pacs_serve.jobs(study)) == 1


def test_a_study_the_pacs_does_not_know_falls_back_to_the_quiet_period(pacs_serve: Serve, storescu: str,
                                                                       tmp_path: Path) -> None:
    study, series = _study(tmp_path, "unknown", (2,))
    pacs_serve.send(storescu, series[0])  # never stored in Orthanc: C-FIND finds no match
    [job] = pacs_serve.wait_jobs(study, 1, timeout=20)
    assert "completion: quiet period (PACS did not answer)" in pacs_serve.completion_note(job)
    assert 4.0 <= pacs_serve.start_delay(job) <= 6.0
    _logged_once_without_phi(pacs_serve.log, f"study {job.study_id}: the PACS did not answer the C-FIND (study not found)")


def test_quiet_mode_splits_the_same_sends(tmp_path: Path, orthanc: Pacs, storescu: str) -> None:
    study, series = _study(tmp_path, "split-quiet", (3, 2))
    _in_orthanc(storescu, orthanc, series[0] + series[1])
    with _serve(tmp_path, orthanc.dicom_port, orthanc.ae_title,
                {"DICOM_FUSION_COMPLETION__QUIET_SECONDS": "2"}) as serve:
        serve.send(storescu, series[0])
        time.sleep(5)
        serve.send(storescu, series[1])
        jobs = serve.wait_jobs(study, 2, timeout=20)
    assert [(j.version, j.instance_count) for j in jobs] == [(1, 3), (2, 5)]
    print(f"completeness: quiet mode (2 s), second series 5 s later: {len(jobs)} jobs "
          f"({', '.join(str(j.instance_count) for j in jobs)} instances)")
    assert "completion: quiet period" in serve.completion_note(jobs[0])


def test_pacs_down_falls_back_to_the_quiet_period(tmp_path: Path, storescu: str) -> None:
    closed = free_port()  # nothing listens there: the association is refused
    study, series = _study(tmp_path, "down", (2,))
    with _serve(tmp_path, closed, "ORTHANC", {"DICOM_FUSION_COMPLETION__MODE": "pacs",
                                              "DICOM_FUSION_COMPLETION__QUIET_SECONDS": "1.5"}) as serve:
        serve.send(storescu, series[0])
        [job] = serve.wait_jobs(study, 1, timeout=20)
        with serve.ledger.session() as s:
            study_id = s.scalar(select(Study.id).where(Study.study_uid == study))
        time.sleep(1)
    assert "completion: quiet period (PACS did not answer)" in serve.completion_note(job)
    assert 1.5 <= serve.start_delay(job) <= 3.0
    _logged_once_without_phi(serve.log, f"study {study_id}: the PACS did not answer the C-FIND (C-FIND: Could not connect")
