"""Broker restart: Redis is killed (-9) while studies flow and restarted on the same port; every job
still finishes with exactly one SR (ledger reaper + idempotent stages)."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Figures, require, write_instance
from faultlib import Proc, base_env, wait_until

from dicom_fusion.service.demo.components import Pacs, free_port, start_redis
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import JobState

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def test_redis_killed_and_restarted(tmp_path: Path, orthanc: Pacs, storescu: str, figures: Figures) -> None:
    require(shutil.which("redis-server") is not None, "redis-server")
    redis = start_redis(tmp_path / "redis")
    port = free_port()
    env = base_env(tmp_path / "var", port, DICOM_FUSION_BROKER__URL=redis.url,
                   DICOM_FUSION_PACS__AE_TITLE=orthanc.ae_title, DICOM_FUSION_PACS__PORT=str(orthanc.dicom_port),
                   DICOM_FUSION_WORKER__LEASE_SECONDS="2", DICOM_FUSION_WORKER__QUEUED_LEASE_SECONDS="5")
    serve = Proc(["serve"], env, tmp_path / "serve.log", tmp_path).start(wait_port=port)
    studies = [f"1.2.826.0.1.3680043.8.498.99.{n}" for n in range(1, 4)]
    try:
        for st in studies:
            f = write_instance(tmp_path / "in" / f"{st}.dcm", study_uid=st, series_uid=st + ".1", sop_uid=st + ".1.1")
            subprocess.run([storescu, "-aec", "DFUSION", "127.0.0.1", str(port), str(f)], check=True,
                           capture_output=True)
        time.sleep(0.7)  # studies complete (quiet 0.5 s) while the broker dies
        redis.kill()
        time.sleep(3)
        redis.restart()
        ledger = Ledger(f"sqlite:///{tmp_path / 'var' / 'ledger.sqlite'}")

        def all_finished() -> bool:
            jobs = [j for st in studies for j in ledger.jobs_for_study(st)]
            return len(jobs) == len(studies) and all(j.state in (JobState.DONE, JobState.DEAD) for j in jobs)

        wait_until(all_finished, 120, "all jobs finished after the broker restart")
        srs = 0
        for st in studies:
            [job] = ledger.jobs_for_study(st)
            assert job.state == JobState.DONE, job.error
            n = orthanc.instance_count(str(job.sr_uid))
            assert n == 1
            srs += n
        figures.rounds, figures.sent, figures.acknowledged, figures.stored = 1, 3, 3, srs
        assert serve.alive
    finally:
        serve.stop()
        redis.stop()
