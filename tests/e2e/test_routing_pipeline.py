"""Routing end to end: what a PACS forwards is not all for the model.

A synthetic radiograph, pydicom's MR and CT slices and the SR this service produced (looped back by
the PACS's auto-routing) go to `dicom-fusion serve` with storescu. The radiograph gets exactly one SR
and one DiagnosticReport; the MR, the CT and our own SR are `ignored` with the reason, produce nothing,
and neither fail nor reach the dead letters.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from test_spine import Stack, _orthanc, _sr_instances, _storescu, cohort, running_serve  # noqa: F401

from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.inference.synth.generate import SyntheticPatient
from dicom_fusion.service.demo.components import FhirServer, Pacs
from dicom_fusion.service.ops.monitoring import dead_jobs, studies_by_state
from dicom_fusion.service.storage.models import Job, JobState

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def _wait_state(stack: Stack, study_uid: str, timeout: float = 90.0) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = stack.ledger.jobs_for_study(study_uid)
        if jobs and jobs[-1].state in (JobState.DONE, JobState.DEAD, JobState.IGNORED):
            return jobs[-1]
        time.sleep(0.3)
    raise AssertionError(f"no final job for {study_uid} in {timeout}s:\n{stack.log.read_text()[-3000:]}")


def test_only_what_a_route_takes_is_processed(tmp_path: Path, orthanc: Pacs, fhir_server: FhirServer,
                                              cohort: list[SyntheticPatient], storescu: str) -> None:  # noqa: F811
    patient = cohort[2]
    mr, ct = tmp_path / "in" / "mr.dcm", tmp_path / "in" / "ct.dcm"
    mr.parent.mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), mr)
    shutil.copy(get_testdata_file("CT_small.dcm"), ct)
    with running_serve(tmp_path, orthanc, fhir_server, {}) as stack:
        _storescu(storescu, stack, sorted(Path(patient.study_dir).glob("*.dcm")) + [mr, ct])
        dx_job = _wait_state(stack, patient.study_instance_uid)
        assert dx_job.state == JobState.DONE, dx_job.error
        assert dx_job.route == "default" and dx_job.model.startswith("dfusion-hybrid-demo")
        for f, modality in ((mr, "MR"), (ct, "CT")):
            uid = dcmread(f).StudyInstanceUID
            job = _wait_state(stack, uid)
            assert job.state == JobState.IGNORED and job.route == ""
            assert f"({modality}): model dfusion-hybrid-demo" in (job.error or "")
            assert _sr_instances(orthanc, uid) == []

        # the PACS routes our SR (and Grad-CAM SC) back to us: recorded, ignored, no second result
        ours = _sr_instances(orthanc, patient.study_instance_uid) + \
            _sr_instances(orthanc, patient.study_instance_uid, modality="OT")
        assert len(ours) == 2
        looped = []
        for i, oid in enumerate(ours):
            looped.append(tmp_path / "loop" / f"{i}.dcm")
            looped[-1].parent.mkdir(exist_ok=True)
            looped[-1].write_bytes(_orthanc(orthanc, f"/instances/{oid}/file"))  # type: ignore[arg-type]
        # sent with our own sender (pynetdicom proposes each file's SOP class, the Comprehensive 3D SR included)
        subprocess.run([sys.executable, "-m", "dicom_fusion.service.cli", "send", str(looped[0].parent), "--port",
                        str(stack.port), "--aet", "TESTPACS"], check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while len(stack.ledger.jobs_for_study(patient.study_instance_uid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        v2 = _wait_state(stack, patient.study_instance_uid)
        assert v2.version == 2 and v2.state == JobState.IGNORED, (v2.state, v2.error)
        assert "nothing new for route default" in (v2.error or "")
        time.sleep(2)
        assert len(_sr_instances(orthanc, patient.study_instance_uid)) == 1
        with FhirClient(fhir_server.base_url) as client:
            assert len(list(client.search("DiagnosticReport", {"subject": f"Patient/{patient.fhir_id}"}))) == 1

        counts = studies_by_state(stack.ledger)
        assert counts["ignored"] == 3 and counts["dead"] == 0 and counts["failed"] == 0
        assert dead_jobs(stack.ledger) == ()
