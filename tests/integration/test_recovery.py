"""The ledger, not the broker, is the source of truth: a job whose message is lost is re-enqueued by
the reaper once its lease expires, and still yields exactly one SR."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_instance

from dicom_fusion.service.demo.components import Pacs, free_port
from dicom_fusion.service.server import wait_for_port
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import JobState

pytestmark = pytest.mark.integration


def _env(tmp: Path, port: int, pacs: Pacs) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DICOM_FUSION_CONFIG", None)
    env.update({
        "DICOM_FUSION_DATA_DIR": str(tmp / "var"),
        "DICOM_FUSION_LISTENER__PORT": str(port),
        "DICOM_FUSION_PACS__AE_TITLE": pacs.ae_title,
        "DICOM_FUSION_PACS__PORT": str(pacs.dicom_port),
        "DICOM_FUSION_COMPLETION__QUIET_SECONDS": "0.5",
        "DICOM_FUSION_WORKER__QUEUED_LEASE_SECONDS": "3",
        "DICOM_FUSION_WORKER__REAPER_INTERVAL_SECONDS": "0.5",
    })
    return env


def _wait(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_lost_message_is_reenqueued_by_the_reaper(tmp_path: Path, orthanc: Pacs, storescu: str) -> None:
    port = free_port()
    env = _env(tmp_path, port, orthanc)
    study = "1.2.826.0.1.3680043.8.498.777"
    files = [write_instance(tmp_path / "in" / f"{i}.dcm", study_uid=study, series_uid=study + ".1",
                            sop_uid=f"{study}.1.{i}") for i in range(1, 3)]
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "serve", "--no-worker"],
                             env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    worker = None
    try:
        wait_for_port("127.0.0.1", port)
        subprocess.run([storescu, "-aec", "DFUSION", "127.0.0.1", str(port), *map(str, files)], check=True,
                       capture_output=True)
        ledger = Ledger(f"sqlite:///{tmp_path / 'var' / 'ledger.sqlite'}")
        _wait(lambda: [j.state for j in ledger.jobs_for_study(study)] == [JobState.QUEUED], 20, "queued job")
        queue = tmp_path / "var" / "broker" / "queue"
        _wait(lambda: any(queue.glob("*.msg")), 10, "prepare message in the broker")
        lost = list(queue.glob("*.msg"))
        assert lost, "the embedded broker should hold the prepare message"
        for m in lost:  # the broker loses the message, as the filesystem transport does on kill -9
            m.unlink()
        worker = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "worker"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        _wait(lambda: ledger.jobs_for_study(study)[0].state in (JobState.DONE, JobState.DEAD), 90, "job done")
        [job] = ledger.jobs_for_study(study)
        assert job.state == JobState.DONE, job.error
        events = [e.event for e in ledger.audit_events("job", job.id)]
        assert "requeued" in events
        assert orthanc.instance_count(str(job.sr_uid)) == 1
    finally:
        for p in (worker, serve):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
