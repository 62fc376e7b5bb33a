"""A real `dicom-fusion worker` (server.run_worker: its queues in consume order, the Celery app of
jobs/queues.py, claim → body → advance → publish of jobs/worker.py) whose four stage bodies only record
what ran and take PRIORITY_STAGE_SECONDS each, for tests/integration/test_priority_queues.py.

    PRIORITY_RECORD=/tmp/ran.txt PRIORITY_STAGE_SECONDS=0.3 DICOM_FUSION_DATA_DIR=… python priority_worker.py

Each line of the record: ``<job id> <stage>`` when the stage body starts.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from dicom_fusion.service.config import load_settings
from dicom_fusion.service.jobs import stages
from dicom_fusion.service.server import run_worker
from dicom_fusion.service.storage.models import Stage

RECORD = Path(os.environ["PRIORITY_RECORD"])
SECONDS = float(os.environ.get("PRIORITY_STAGE_SECONDS", "0.3"))
NEXT = {Stage.PREPARE: Stage.TIMELINE, Stage.TIMELINE: Stage.INFER, Stage.INFER: Stage.DELIVER,
        Stage.DELIVER: Stage.FINISHED}


def _body(stage: Stage) -> Any:
    def body(_runtime: Any, job: Any) -> Stage:
        with RECORD.open("a") as fh:
            fh.write(f"{job.job_id} {stage.value}\n")
        time.sleep(SECONDS)
        return NEXT[stage]

    return body


if __name__ == "__main__":
    for st in NEXT:
        setattr(stages, st.value, _body(st))
    run_worker(load_settings())
    sys.exit(0)
