"""PACS outages: the SR delivery is retried with backoff and lands after recovery; past the retry
budget the job and its SR delivery are `dead` with a reason, and re-delivery completes them."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import Figures, require, write_instance
from faultlib import Proc, base_env, wait_until

from dicom_fusion.service.config import load_settings
from dicom_fusion.service.demo import components
from dicom_fusion.service.jobs.queues import enqueue, make_celery
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import DeliveryState, JobState, Stage

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def _study(tmp: Path, n: int) -> tuple[str, list[Path]]:
    study = f"1.2.826.0.1.3680043.8.498.55.{n}"
    return study, [write_instance(tmp / "in" / f"{study}.1.{i}.dcm", study_uid=study, series_uid=f"{study}.1",
                                  sop_uid=f"{study}.1.{i}") for i in range(1, 3)]


@pytest.fixture
def pacs(tmp_path: Path) -> components.Pacs:
    require(components.orthanc_executable() is not None, "Orthanc")
    p = components.start_orthanc(tmp_path / "orthanc")
    yield p  # type: ignore[misc]
    p.stop()


def _serve(tmp: Path, pacs: components.Pacs, retries: int) -> tuple[Proc, int, Ledger]:
    port = components.free_port()
    env = base_env(tmp / "var", port, DICOM_FUSION_PACS__AE_TITLE=pacs.ae_title,
                   DICOM_FUSION_PACS__PORT=str(pacs.dicom_port), DICOM_FUSION_PACS__TIMEOUT="5",
                   DICOM_FUSION_WORKER__MAX_RETRIES=str(retries),
                   DICOM_FUSION_WORKER__RETRY_BACKOFF_SECONDS="1", DICOM_FUSION_WORKER__RETRY_BACKOFF_MAX_SECONDS="2")
    serve = Proc(["serve"], env, tmp / "serve.log", tmp).start(wait_port=port)
    return serve, port, Ledger(f"sqlite:///{tmp / 'var' / 'ledger.sqlite'}")


def test_pacs_down_then_back(tmp_path: Path, pacs: components.Pacs, storescu: str, figures: Figures) -> None:
    serve, port, ledger = _serve(tmp_path, pacs, retries=8)
    try:
        pacs.stop()
        study, files = _study(tmp_path, 1)
        subprocess.run([storescu, "-aec", "DFUSION", "127.0.0.1", str(port), *map(str, files)], check=True,
                       capture_output=True)
        wait_until(lambda: any(j.state == JobState.FAILED for j in ledger.jobs_for_study(study)), 60,
                   "delivery failing while the PACS is down")
        [job] = ledger.jobs_for_study(study)
        assert "sr" in (job.error or "")
        pacs.restart()
        wait_until(lambda: ledger.jobs_for_study(study)[0].state in (JobState.DONE, JobState.DEAD), 60,
                   "delivery after the PACS is back")
        [job] = ledger.jobs_for_study(study)
        assert job.state == JobState.DONE, job.error
        [sr] = [d for d in ledger.deliveries(job.id) if d.kind == "sr"]
        assert sr.state == DeliveryState.DELIVERED and sr.attempts >= 2
        n = pacs.instance_count(str(job.sr_uid))
        figures.rounds, figures.sent, figures.acknowledged, figures.stored = 1, 1, 1, n
        figures.lost, figures.duplicates = int(n == 0), max(n - 1, 0)
        assert n == 1
    finally:
        serve.stop()


def test_pacs_down_past_retry_budget_is_dead_then_redelivered(tmp_path: Path, pacs: components.Pacs,
                                                                storescu: str, figures: Figures) -> None:
    serve, port, ledger = _serve(tmp_path, pacs, retries=1)
    try:
        pacs.stop()
        study, files = _study(tmp_path, 2)
        subprocess.run([storescu, "-aec", "DFUSION", "127.0.0.1", str(port), *map(str, files)], check=True,
                       capture_output=True)
        wait_until(lambda: any(j.state == JobState.DEAD for j in ledger.jobs_for_study(study)), 60, "dead job")
        [job] = ledger.jobs_for_study(study)
        assert "retries exhausted" in (job.error or "")
        # the worker marks the job dead, then its missing delivery sides (a moment later on a busy machine)
        wait_until(lambda: [d.state for d in ledger.deliveries(job.id) if d.kind == "sr"] == [DeliveryState.DEAD],
                   30, "dead SR delivery")
        [sr] = [d for d in ledger.deliveries(job.id) if d.kind == "sr"]
        assert sr.state == DeliveryState.DEAD and sr.last_error
        pacs.restart()
        # One operator action re-delivers the dead job (the same thing `dicom-fusion redeliver` does).
        settings = load_settings(data_dir=tmp_path / "var")
        assert ledger.reset_for_redelivery(job.id)
        enqueue(make_celery(settings), ledger, settings, job.id, Stage.DELIVER)
        wait_until(lambda: ledger.jobs_for_study(study)[0].state == JobState.DONE, 60, "re-delivered job")
        n = pacs.instance_count(str(job.sr_uid))
        figures.rounds, figures.sent, figures.acknowledged, figures.stored = 1, 1, 1, n
        figures.lost, figures.duplicates = int(n == 0), max(n - 1, 0)
        assert n == 1
    finally:
        serve.stop()
