"""Review before release, end to end (real `serve`, Orthanc, FHIR server, the `dicom-fusion review` CLI).

With `release.mode = "review"` and `send_preliminary`, two studies are inferred and wait: the EHR gets a
preliminary DiagnosticReport for each, the PACS nothing. Approving one sends a VERIFIED SR naming the
reviewer (dciodvfy-clean) and turns the same DiagnosticReport final (version 2, one resource); approving
it again is refused and sends nothing. Rejecting the other marks its report entered-in-error; no SR.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from test_spine import Stack, _orthanc, _sr_instances, _storescu, running_serve

from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.inference.synth.generate import SyntheticPatient, generate_cohort
from dicom_fusion.service.demo.components import FhirServer, Pacs
from dicom_fusion.service.outputs.sr.reader import read_sr
from dicom_fusion.service.storage.models import Job, JobState

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REVIEW_ENV = {"DICOM_FUSION_RELEASE__MODE": "review", "DICOM_FUSION_RELEASE__SEND_PRELIMINARY": "true",
              "DICOM_FUSION_RELEASE__ORGANIZATION": "Test General Hospital"}


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory, fhir_server: FhirServer) -> list[SyntheticPatient]:
    found = generate_cohort(2, tmp_path_factory.mktemp("review-cohort"), seed=31, progress=False)
    with FhirClient(fhir_server.base_url) as client:
        for p in found:
            client.transaction(json.loads(Path(p.bundle_path).read_text()))
    return found


def _wait(stack: Stack, study_uid: str, states: tuple[str, ...], timeout: float = 120.0) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = stack.ledger.jobs_for_study(study_uid)
        if jobs and jobs[-1].state in states:
            return jobs[-1]
        if stack.proc.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"{study_uid} not in {states} after {timeout}s:\n{stack.log.read_text()[-3000:]}")


def _review(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DICOM_FUSION_CONFIG"}
    env.update({"DICOM_FUSION_DATA_DIR": str(stack.data_dir), **REVIEW_ENV})
    return subprocess.run([sys.executable, "-m", "dicom_fusion.service.cli", "review", *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=stack.data_dir.parent)


def _reports(fhir: FhirServer, patient: SyntheticPatient) -> list[dict[str, object]]:
    with FhirClient(fhir.base_url) as client:
        return list(client.search("DiagnosticReport", {"subject": f"Patient/{patient.fhir_id}"}))


def test_nothing_leaves_before_review_then_approve_and_reject(tmp_path: Path, orthanc: Pacs, fhir_server: FhirServer,
                                                              patients: list[SyntheticPatient], storescu: str,
                                                              dciodvfy: str) -> None:
    approved, rejected = patients
    with running_serve(tmp_path, orthanc, fhir_server, REVIEW_ENV) as stack:
        for p in patients:
            _storescu(storescu, stack, sorted(Path(p.study_dir).glob("*.dcm")))
        jobs = {p.study_instance_uid: _wait(stack, p.study_instance_uid, (JobState.AWAITING_REVIEW, JobState.DEAD))
                for p in patients}
        assert {j.state for j in jobs.values()} == {JobState.AWAITING_REVIEW}, [j.error for j in jobs.values()]
        for p in patients:  # a preliminary report in the EHR, nothing in the PACS
            [report] = _reports(fhir_server, p)
            assert report["status"] == "preliminary" and "not reviewed by a clinician" in str(report["conclusion"])
            assert _sr_instances(orthanc, p.study_instance_uid) == []

        listing = _review(stack, "list")
        assert listing.returncode == 0 and all(str(j.id) in listing.stdout for j in jobs.values()), listing

        job = jobs[approved.study_instance_uid]
        done = _review(stack, "approve", str(job.id), "--reviewer", "Jane Smith", "--comment", "agree with AI",
                       "--model", job.model)
        assert done.returncode == 0 and "approved" in done.stdout, done.stderr
        final = _wait(stack, approved.study_instance_uid, (JobState.DONE, JobState.DEAD))
        assert final.state == JobState.DONE and final.reviewer == "Jane Smith", final.error

        [sr_id] = _sr_instances(orthanc, approved.study_instance_uid)
        sr_file = tmp_path / "verified-sr.dcm"
        sr_file.write_bytes(_orthanc(orthanc, f"/instances/{sr_id}/file"))  # type: ignore[arg-type]
        sr = dcmread(sr_file)
        assert (sr.VerificationFlag, sr.PreliminaryFlag, sr.CompletionFlag) == ("VERIFIED", "FINAL", "COMPLETE")
        observer = sr.VerifyingObserverSequence[0]
        assert (str(observer.VerifyingObserverName), observer.VerifyingOrganization) == (
            "Smith^Jane", "Test General Hospital")
        reading = read_sr(sr)
        assert reading.review[-1] == "Reviewer comment: agree with AI" and reading.sop_instance_uid == final.sr_uid
        res = subprocess.run([dciodvfy, str(sr_file)], capture_output=True, text=True)
        assert [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")] == [], res.stderr

        [report] = _reports(fhir_server, approved)  # the same resource, now final: version 2
        assert report["status"] == "final" and report["meta"]["versionId"] == "2"  # type: ignore[index]
        assert report["resultsInterpreter"] == [{"display": "Jane Smith"}]

        again = _review(stack, "approve", str(job.id), "--reviewer", "Someone Else")
        assert again.returncode == 1 and "not awaiting review" in again.stderr and "Jane Smith" in again.stderr
        other = jobs[rejected.study_instance_uid]
        wrong = _review(stack, "approve", str(other.id), "--reviewer", "A B", "--finding", "no-such-class")
        assert wrong.returncode == 1 and "not a class of" in wrong.stderr

        no = _review(stack, "reject", str(other.id), "--reviewer", "John Doe", "--comment", "motion artefact")
        assert no.returncode == 0 and "entered-in-error" in no.stdout, no.stderr
        gone = _wait(stack, rejected.study_instance_uid, (JobState.REJECTED, JobState.DEAD))
        assert gone.state == JobState.REJECTED, gone.error
        [report] = _reports(fhir_server, rejected)
        assert report["status"] == "entered-in-error" and "motion artefact" in str(report["conclusion"])
        time.sleep(1)
        assert _sr_instances(orthanc, rejected.study_instance_uid) == []
        assert len(_sr_instances(orthanc, approved.study_instance_uid)) == 1
        assert "motion artefact" not in stack.log.read_text() and "agree with AI" not in stack.log.read_text()
