"""Review before release, end to end (real `serve`, Orthanc, FHIR server, the `dicom-fusion review` CLI).

With `release.mode = "review"` and `send_preliminary`, two studies are inferred and wait: the EHR gets a
preliminary DiagnosticReport for each, the PACS nothing. Approving one sends a VERIFIED SR naming the
reviewer (dciodvfy-clean) and turns the same DiagnosticReport final (version 2, one resource); approving
it again is refused and sends nothing. Rejecting the other marks its report entered-in-error; no SR.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from browser import Browser
from test_spine import Stack, _orthanc, _sr_instances, _storescu, running_serve

from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.inference.synth.generate import SyntheticPatient, generate_cohort
from dicom_fusion.service.demo.components import FhirServer, Pacs, free_port
from dicom_fusion.service.server import wait_for_port
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


def _reports(fhir: FhirServer, job: Job) -> list[dict[str, object]]:
    """The job's DiagnosticReports, by their identifier (the job's SR UID). Not by patient: the synthetic
    cohorts of different seeds reuse patient ids, and the module's FHIR server keeps every test's reports."""
    with FhirClient(fhir.base_url) as client:
        return list(client.search("DiagnosticReport", {"identifier": f"urn:dicom:uid|urn:oid:{job.sr_uid}"}))


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
            [report] = _reports(fhir_server, jobs[p.study_instance_uid])
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

        [report] = _reports(fhir_server, final)  # the same resource, now final: version 2
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
        [report] = _reports(fhir_server, gone)
        assert report["status"] == "entered-in-error" and "motion artefact" in str(report["conclusion"])
        time.sleep(1)
        assert _sr_instances(orthanc, rejected.study_instance_uid) == []
        assert len(_sr_instances(orthanc, approved.study_instance_uid)) == 1
        assert "motion artefact" not in stack.log.read_text() and "agree with AI" not in stack.log.read_text()


SHOTS = Path(__file__).resolve().parents[2] / "docs" / "images"
PASSWORD = "a long enough password"


def _users(stack: Stack, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DICOM_FUSION_CONFIG"}
    env["DICOM_FUSION_DATA_DIR"] = str(stack.data_dir)
    return subprocess.run([sys.executable, "-m", "dicom_fusion.service.cli", "users", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=stack.data_dir.parent)


def _sign_in(browser: Browser, base: str, username: str, password: str = PASSWORD) -> None:
    browser.goto(f"{base}/dashboard")
    assert "/login" in browser.url  # no session: the sign-in form, never a token in the URL
    browser.eval(f"document.getElementById('username').value = {json.dumps(username)};"
                 f"document.getElementById('password').value = {json.dumps(password)};")
    browser.submit_and_wait("document.getElementById('login').submit()")


def test_a_reviewer_approves_and_rejects_in_the_browser(tmp_path: Path, orthanc: Pacs, fhir_server: FhirServer,
                                                        storescu: str) -> None:
    """Real Chromium, real serve + api, Orthanc and FHIR: sign in as a reviewer, approve one study from
    the review page, reject another with the keyboard; a viewer gets 403; no CSRF token, no action;
    five wrong passwords slow the account down. Screenshots of the worklist and the review page go to
    docs/images when DICOM_FUSION_SCREENSHOTS=1 (the README shows them)."""
    found = generate_cohort(2, tmp_path / "cohort", seed=37, progress=False)
    with FhirClient(fhir_server.base_url) as client:
        for p in found:
            client.transaction(json.loads(Path(p.bundle_path).read_text()))
    api_port = free_port()
    with running_serve(tmp_path, orthanc, fhir_server, REVIEW_ENV) as stack:
        env = {k: v for k, v in os.environ.items() if k != "DICOM_FUSION_CONFIG"}
        env.update({"DICOM_FUSION_DATA_DIR": str(stack.data_dir), "DICOM_FUSION_API__PORT": str(api_port),
                    "DICOM_FUSION_API__TOKEN": "service-token-e2e", "DICOM_FUSION_FHIR__BASE_URL": fhir_server.base_url,
                    **REVIEW_ENV})
        with (tmp_path / "api.log").open("wb") as fh:
            api = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "api"], env=env, stdout=fh,
                                   stderr=subprocess.STDOUT, cwd=tmp_path)
        browsers: list[Browser] = []
        try:
            wait_for_port("127.0.0.1", api_port, timeout=60)
            base = f"http://127.0.0.1:{api_port}"
            for name, role, display in (("jsmith", "reviewer", "Jane Smith"), ("vera", "viewer", "Vera Viewer")):
                made = _users(stack, "add", name, "--role", role, "--name", display, "--organization",
                              "Test General Hospital", "--password-stdin", stdin=PASSWORD + "\n")
                assert made.returncode == 0, made.stderr
            for p in found:
                _storescu(storescu, stack, sorted(Path(p.study_dir).glob("*.dcm")))
            jobs = [_wait(stack, p.study_instance_uid, (JobState.AWAITING_REVIEW, JobState.DEAD)) for p in found]
            assert [j.state for j in jobs] == [JobState.AWAITING_REVIEW] * 2, [j.error for j in jobs]

            rev = Browser(tmp_path / "chromium-reviewer")
            browsers.append(rev)
            _sign_in(rev, base, "jsmith")
            assert rev.url.endswith("/dashboard"), rev.eval("document.body.textContent")
            assert "Jane Smith" in rev.eval("document.getElementById('who').textContent")
            assert rev.eval("document.getElementById('kpi-review').textContent").startswith("2 awaiting review")
            rev.goto(f"{base}/review")
            listed = rev.eval("Array.from(document.querySelectorAll('tr[data-job]')).map(r => Number(r.dataset.job))")
            assert sorted(listed) == sorted(j.id for j in jobs)
            if os.environ.get("DICOM_FUSION_SCREENSHOTS"):
                rev.screenshot(SHOTS / "review-worklist.png")
            first, second = jobs
            rev.submit_and_wait(f"document.querySelector('tr[data-job=\"{first.id}\"] a').click()")
            assert rev.url.endswith(f"/review/{first.id}")
            assert rev.wait_for("document.getElementById('overlay') && document.getElementById('overlay').naturalWidth")
            if rev.eval("!!document.getElementById('lesion')"):  # a lesion was segmented: its outline loads
                assert rev.wait_for("document.getElementById('lesion-outline').naturalWidth > 0")
            assert rev.eval("document.querySelectorAll('#drivers li').length") == 3
            assert rev.eval("document.querySelectorAll('svg.spark').length") >= 1
            if os.environ.get("DICOM_FUSION_SCREENSHOTS"):
                rev.screenshot(SHOTS / "review-page.png")
            # a request without the session's CSRF token is refused, whoever's cookie it carries
            status = rev.eval(f"fetch('/api/review/{first.id}/approve', {{method: 'POST', headers: "
                              "{'Content-Type': 'application/json'}, body: '{}'}).then(r => r.status)",
                              await_promise=True)
            assert status == 403
            rev.eval("document.getElementById('comment').value = 'agree, lesion visible'")
            rev.eval("document.getElementById('approve').click()")
            assert "approved" in rev.wait_for("document.getElementById('outcome').textContent")
            approved = _wait(stack, found[0].study_instance_uid, (JobState.DONE, JobState.DEAD))
            assert approved.state == JobState.DONE and approved.reviewer == "Jane Smith", approved.error
            [sr_id] = _sr_instances(orthanc, found[0].study_instance_uid)
            sr = dcmread(io.BytesIO(_orthanc(orthanc, f"/instances/{sr_id}/file")))  # type: ignore[arg-type]
            assert sr.VerificationFlag == "VERIFIED"
            assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Smith^Jane"
            assert sr.VerifyingObserverSequence[0].VerifyingOrganization == "Test General Hospital"
            [report] = _reports(fhir_server, approved)
            assert (report["status"], report["meta"]["versionId"]) == ("final", "2")  # type: ignore[index]

            # the second with the keyboard: r rejects
            rev.goto(f"{base}/review/{second.id}")
            rev.eval("document.getElementById('comment').value = 'wrong side'")
            rev.eval("document.body.dispatchEvent(new KeyboardEvent('keydown', {key: 'r', bubbles: true}))")
            assert "rejected" in rev.wait_for("document.getElementById('outcome').textContent")
            rejected = _wait(stack, found[1].study_instance_uid, (JobState.REJECTED, JobState.DEAD))
            assert rejected.state == JobState.REJECTED
            [report] = _reports(fhir_server, rejected)
            assert report["status"] == "entered-in-error"
            assert _sr_instances(orthanc, found[1].study_instance_uid) == []

            # a viewer may look but not approve
            viewer = Browser(tmp_path / "chromium-viewer")
            browsers.append(viewer)
            _sign_in(viewer, base, "vera")
            viewer.goto(f"{base}/review/{first.id}")
            assert viewer.eval("document.getElementById('approve')") is None
            status = viewer.eval(
                f"fetch('/api/review/{second.id}/approve', {{method: 'POST', body: '{{}}', headers: "
                "{'Content-Type': 'application/json', 'X-CSRF-Token': "
                "document.querySelector('meta[name=csrf-token]').content}}).then(r => r.status)", await_promise=True)
            assert status == 403

            # five wrong passwords: the sixth attempt is refused even with the right one, and audited
            guesser = Browser(tmp_path / "chromium-guesser")
            browsers.append(guesser)
            for _ in range(5):
                _sign_in(guesser, base, "vera", "not the password")
                assert "/login" in guesser.url or "wrong username" in guesser.eval("document.body.textContent")
            _sign_in(guesser, base, "vera")
            assert "cooling down" in guesser.eval("document.body.textContent")
            refused = [e for e in stack.ledger.audit_events("user", 2) if e.event == "sign_in_refused"]
            assert len(refused) == 6 and PASSWORD not in " ".join(e.detail for e in refused)
        finally:
            for b in browsers:
                b.close()
            api.terminate()
            api.wait(timeout=30)


def test_an_approval_after_a_preliminary_sr_references_it(tmp_path: Path, orthanc: Pacs, fhir_server: FhirServer,
                                                          storescu: str, dciodvfy: str) -> None:
    """`release.send_preliminary_sr`: the UNVERIFIED SR is in the PACS before review; the approval sends a
    new VERIFIED SR in the same series that names it in its Predecessor Documents Sequence (no silent
    duplicate, no second SR with the same UID)."""
    [patient] = generate_cohort(1, tmp_path / "cohort", seed=41, progress=False)
    with FhirClient(fhir_server.base_url) as client:
        client.transaction(json.loads(Path(patient.bundle_path).read_text()))
    env = {**REVIEW_ENV, "DICOM_FUSION_RELEASE__SEND_PRELIMINARY_SR": "true"}
    with running_serve(tmp_path, orthanc, fhir_server, env) as stack:
        _storescu(storescu, stack, sorted(Path(patient.study_dir).glob("*.dcm")))
        job = _wait(stack, patient.study_instance_uid, (JobState.AWAITING_REVIEW, JobState.DEAD))
        assert job.state == JobState.AWAITING_REVIEW, job.error
        [first] = _sr_instances(orthanc, patient.study_instance_uid)
        unverified = dcmread(io.BytesIO(_orthanc(orthanc, f"/instances/{first}/file")))  # type: ignore[arg-type]
        assert unverified.VerificationFlag == "UNVERIFIED" and unverified.SOPInstanceUID == job.sr_uid

        done = _review(stack, "approve", str(job.id), "--reviewer", "Jane Smith")
        assert done.returncode == 0, done.stderr
        final = _wait(stack, patient.study_instance_uid, (JobState.DONE, JobState.DEAD))
        assert final.state == JobState.DONE, final.error
        srs = [dcmread(io.BytesIO(_orthanc(orthanc, f"/instances/{i}/file")))  # type: ignore[arg-type]
               for i in _sr_instances(orthanc, patient.study_instance_uid)]
        [verified] = [s for s in srs if s.VerificationFlag == "VERIFIED"]
        assert len(srs) == 2 and verified.SOPInstanceUID != unverified.SOPInstanceUID
        assert verified.SeriesInstanceUID == unverified.SeriesInstanceUID and verified.InstanceNumber == 2
        ref = verified.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == unverified.SOPInstanceUID
        sr_file = tmp_path / "verified.dcm"
        verified.save_as(sr_file, enforce_file_format=True)
        res = subprocess.run([dciodvfy, str(sr_file)], capture_output=True, text=True)
        assert [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")] == [], res.stderr
        [report] = _reports(fhir_server, final)
        assert report["status"] == "final"
