"""STOW-RS end to end on real components: `dicom-fusion api` + `dicom-fusion serve`, Orthanc, the FHIR server.

A synthetic study stored with `dicomweb-client` (a maintained DICOMweb client) and another with `curl` and a
hand-made multipart body complete like C-STORE'd studies (quiet period): each gets its SR in Orthanc and one
DiagnosticReport in FHIR. Storing again reports success and stores no second copy; a truncated body stores
nothing and says why; a viewer's token is refused; no patient data reaches either log.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread
from requests import HTTPError
from test_spine import PHI_STRINGS, Stack, _sr_instances, running_serve

from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.inference.synth.generate import SyntheticPatient, generate_cohort
from dicom_fusion.service.demo.components import FhirServer, Pacs, free_port
from dicom_fusion.service.server import wait_for_port
from dicom_fusion.service.storage.models import JobState, Role, Study
from dicom_fusion.service.storage.users import Users

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
SERVICE_TOKEN = "service-token-stow-e2e"
BOUNDARY = "hand-made-boundary-7e4b"


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory, fhir_server: FhirServer) -> list[SyntheticPatient]:
    found = generate_cohort(2, tmp_path_factory.mktemp("stow-cohort"), seed=53, progress=False)
    with FhirClient(fhir_server.base_url) as client:
        for p in found:
            client.transaction(json.loads(Path(p.bundle_path).read_text()))
    return found


def _curl(url: str, token: str, body: Path, *, boundary: str = BOUNDARY) -> tuple[int, dict[str, str], bytes]:
    out = body.with_suffix(".response")
    res = subprocess.run(
        ["curl", "-sS", "-o", str(out), "-D", "-", "-X", "POST", "-H", f"Authorization: Bearer {token}",
         "-H", f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}',
         "-H", "Accept: application/dicom+json", "--data-binary", f"@{body}", url],
        capture_output=True, text=True, timeout=120, check=True)
    lines = res.stdout.strip().splitlines()
    code = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    return code, headers, out.read_bytes()


def _hand_made(files: list[Path], path: Path) -> Path:
    """multipart/related the way a person writes it: CRLF framing, a preamble, an epilogue."""
    parts = [b"This is a STOW-RS request made by hand.\r\n"]
    for f in files:
        parts.append(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes() + b"\r\n")
    parts.append(f"--{BOUNDARY}--\r\nepilogue\r\n".encode())
    path.write_bytes(b"".join(parts))
    return path


def _reports(fhir: FhirServer, patient: SyntheticPatient) -> list[dict[str, object]]:
    with FhirClient(fhir.base_url) as client:
        return list(client.search("DiagnosticReport", {"subject": f"Patient/{patient.fhir_id}"}))


def _check_delivered(stack: Stack, patient: SyntheticPatient) -> None:
    job = stack.wait_done(patient.study_instance_uid, timeout=180)
    assert job.state == JobState.DONE, job.error
    assert len(_sr_instances(stack.pacs, patient.study_instance_uid)) == 1
    [report] = _reports(stack.fhir, patient)
    assert f"urn:oid:{job.sr_uid}" in [i.get("value") for i in report.get("identifier", [])]  # type: ignore[union-attr]
    with stack.ledger.session() as s:
        study = s.query(Study).filter_by(study_uid=patient.study_instance_uid).one()
        assert study.calling_ae == "STOW"


def test_stow_rs_with_dicomweb_client_and_curl(tmp_path: Path, orthanc: Pacs, fhir_server: FhirServer,
                                               patients: list[SyntheticPatient]) -> None:
    api_port = free_port()
    with running_serve(tmp_path, orthanc, fhir_server, {}) as stack:
        env = {k: v for k, v in os.environ.items() if k != "DICOM_FUSION_CONFIG"}
        env.update({"DICOM_FUSION_DATA_DIR": str(stack.data_dir), "DICOM_FUSION_API__PORT": str(api_port),
                    "DICOM_FUSION_API__TOKEN": SERVICE_TOKEN, "DICOM_FUSION_FHIR__BASE_URL": fhir_server.base_url})
        api_log = tmp_path / "api.log"
        with api_log.open("wb") as fh:
            api = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "api"], env=env, stdout=fh,
                                   stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            wait_for_port("127.0.0.1", api_port, timeout=60)
            base = f"http://127.0.0.1:{api_port}/dicomweb"
            users = Users(stack.ledger)
            tokens = {}
            for name, role in (("pacs-cloud", Role.SENDER), ("vera", Role.VIEWER)):
                users.add(name, password="a long enough password", role=role, display_name=name, by="test")
                tokens[name] = users.create_token(name, "stow", by="test")[1]

            # 1. dicomweb-client, as a sender, into /studies/{uid}
            first, second = patients
            files = sorted(Path(first.study_dir).glob("*.dcm"))
            client = DICOMwebClient(url=base, headers={"Authorization": f"Bearer {tokens['pacs-cloud']}"})
            answer: Dataset = client.store_instances([dcmread(f) for f in files],
                                                     study_instance_uid=first.study_instance_uid)
            assert len(answer.ReferencedSOPSequence) == len(files) and "FailedSOPSequence" not in answer
            _check_delivered(stack, first)

            # the same study again: success, no second copy, no second job
            spooled = sorted((stack.data_dir / "spool" / "studies" / first.study_instance_uid).rglob("*.dcm"))
            again = client.store_instances([dcmread(f) for f in files])
            assert len(again.ReferencedSOPSequence) == len(files)
            time.sleep(3)  # past the quiet period: a reopened study would have a version 2 by now
            assert [j.version for j in stack.ledger.jobs_for_study(first.study_instance_uid)] == [1]
            assert sorted((stack.data_dir / "spool" / "studies" / first.study_instance_uid).rglob("*.dcm")) == spooled
            assert len(_sr_instances(stack.pacs, first.study_instance_uid)) == 1
            assert len(_reports(fhir_server, first)) == 1

            # a viewer may not store; nor may anyone without a token
            with pytest.raises(HTTPError) as refused:
                DICOMwebClient(url=base, headers={"Authorization": f"Bearer {tokens['vera']}"}
                               ).store_instances([dcmread(files[0])])
            assert refused.value.response.status_code == 403
            with pytest.raises(HTTPError) as refused:
                DICOMwebClient(url=base).store_instances([dcmread(files[0])])
            assert refused.value.response.status_code == 401

            # 2. curl with a hand-made body, the service token; first cut short: nothing stored, and why
            files = sorted(Path(second.study_dir).glob("*.dcm"))
            body = _hand_made(files, tmp_path / "body.multipart")
            cut = tmp_path / "cut.multipart"
            whole = body.read_bytes()
            cut.write_bytes(whole[:whole.index(files[-1].read_bytes()) + 1000])  # inside the last part
            code, _, text = _curl(f"{base}/studies", SERVICE_TOKEN, cut)
            assert code == 400, text
            assert json.loads(text)["detail"] == (f"the body ends inside part {len(files)} (truncated: no closing "
                                                  "boundary after it): nothing stored")
            assert stack.ledger.jobs_for_study(second.study_instance_uid) == []
            assert not (stack.data_dir / "spool" / "studies" / second.study_instance_uid).exists() or not list(
                (stack.data_dir / "spool" / "studies" / second.study_instance_uid).rglob("*.dcm"))

            code, headers, text = _curl(f"{base}/studies", SERVICE_TOKEN, body)
            assert code == 200, text
            assert headers["content-type"] == "application/dicom+json"
            stored = Dataset.from_json(json.loads(text))
            assert sorted(i.ReferencedSOPInstanceUID for i in stored.ReferencedSOPSequence) == sorted(
                str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
            _check_delivered(stack, second)
        finally:
            api.terminate()
            api.wait(timeout=30)
        for log in (stack.log, api_log):
            text = log.read_text()
            assert "STOW-RS from" in api_log.read_text()
            for phi in PHI_STRINGS:
                assert phi not in text, f"{phi!r} leaked into {log.name}"
