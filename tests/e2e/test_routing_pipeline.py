"""Routing end to end: what a PACS forwards is not all for the model.

A synthetic radiograph, pydicom's MR and CT slices and the SR this service produced (looped back by
the PACS's auto-routing) go to `dicom-fusion serve` with storescu. The radiograph gets exactly one SR
and one DiagnosticReport; the MR, the CT and our own SR are `ignored` with the reason, produce nothing,
and neither fail nor reach the dead letters.

A study mix with no route configured: a synthetic radiograph and a synthetic chest CT each get one SR and
one DiagnosticReport from their own model (the implicit routes `default` and `chest-ct`); an MR, an RT
dose, a third-party SR, a localizer-only series and our SR looped back are `ignored` with the reason.

Several models per study: a route with `continue = true` followed by a route to a second model card
gives one radiograph two jobs, two SRs in the PACS and two DiagnosticReports, each naming its model.
"""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from test_spine import Stack, _orthanc, _sr_instances, _storescu, cohort, running_serve  # noqa: F401

from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.inference.card.model import load_card, write_card
from dicom_fusion.inference.synth.generate import SyntheticPatient, generate_patient
from dicom_fusion.service.config import load_settings
from dicom_fusion.service.outputs.sr.build import read_sr
from dicom_fusion.service.demo.components import FhirServer, Pacs
from dicom_fusion.service.ops.monitoring import dead_jobs, list_studies, studies_by_state
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


def test_a_continue_route_feeds_a_second_model(tmp_path: Path, orthanc: Pacs, fhir_server: FhirServer,
                                               storescu: str) -> None:
    # a patient of its own (FHIR id syn00009: no other e2e cohort has nine patients)
    patient = generate_patient(9, tmp_path / "cohort", seed=41)
    with FhirClient(fhir_server.base_url) as client:
        client.transaction(json.loads(Path(patient.bundle_path).read_text()))
    # a second model: the shipped weights under another name (the service tells models apart by name)
    card = load_card(load_settings(data_dir=tmp_path / "x").model_card_path())
    (tmp_path / "second").mkdir()
    write_card(dataclasses.replace(card, name="dfusion-second-opinion", path=tmp_path / "second" / "card.toml"),
               tmp_path / "second" / "card.toml")
    routes = tmp_path / "routes.toml"
    routes.write_text(f"""
[[routes]]
name = "xr"
model = "default"
continue = true
[routes.match]
Modality = "DX"

[[routes]]
name = "xr-second"
model = "second/card.toml"
[routes.match]
Modality = "DX"
""")
    with running_serve(tmp_path, orthanc, fhir_server, {"DICOM_FUSION_ROUTING__FILE": str(routes)}) as stack:
        _storescu(storescu, stack, sorted(Path(patient.study_dir).glob("*.dcm")))
        first = stack.wait_done(patient.study_instance_uid, version=1)
        second = stack.wait_done(patient.study_instance_uid, version=2)
        jobs = stack.ledger.jobs_for_study(patient.study_instance_uid)
        assert [(j.version, j.route, j.model.split()[0], j.state) for j in jobs] == [
            (1, "xr", card.name, JobState.DONE), (2, "xr-second", "dfusion-second-opinion", JobState.DONE)]
        assert first.sr_uid != second.sr_uid

        srs = _sr_instances(orthanc, patient.study_instance_uid)
        assert len(srs) == 2
        readings = {}
        for oid in srs:
            ds = dcmread(io.BytesIO(_orthanc(orthanc, f"/instances/{oid}/file")))  # type: ignore[arg-type]
            readings[ds.SOPInstanceUID] = read_sr(ds).model_name
        assert readings == {first.sr_uid: card.name, second.sr_uid: "dfusion-second-opinion"}
        with FhirClient(fhir_server.base_url) as client:
            reports = list(client.search("DiagnosticReport", {"subject": f"Patient/{patient.fhir_id}"}))
        assert len(reports) == 2
        by_sr = {next(i["value"] for i in r["identifier"] if i["value"].startswith("urn:oid:")): r for r in reports}
        assert f"model {card.name} " in by_sr[f"urn:oid:{first.sr_uid}"]["conclusion"]
        assert "model dfusion-second-opinion " in by_sr[f"urn:oid:{second.sr_uid}"]["conclusion"]

        row = list_studies(stack.ledger).items
        mine = next(r for r in row if r.study_uid == patient.study_instance_uid)
        assert (mine.state, mine.route) == ("done", "xr, xr-second")
        assert dead_jobs(stack.ledger) == ()


def _fresh_copy(src: Path, dest: Path, **attrs: object) -> Path:
    """A copy of a pydicom test file as a study of its own (new study, series and instance UIDs)."""
    ds = dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for k, v in attrs.items():
        setattr(ds, k, v)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def test_a_study_mix_gets_one_result_per_model_and_the_rest_is_ignored(
        tmp_path: Path, orthanc: Pacs, fhir_server: FhirServer, storescu: str) -> None:
    """What a PACS forwards in a day, with no route configured (the implicit routes `default` and
    `chest-ct`): a radiograph and a chest CT each get one SR + one DiagnosticReport from their own model;
    an MR, an RT dose, a third-party SR, a localizer-only series and our own SR looped back are ignored
    with their reasons, and nothing fails or reaches the dead letters."""
    # patients of their own (FHIR ids syn00007 / syn00008: no other cohort of this module has them)
    dx = generate_patient(7, tmp_path / "cohort", seed=43)
    ct = generate_patient(8, tmp_path / "cohort", seed=43, modality="CT")
    with FhirClient(fhir_server.base_url) as client:
        for p in (dx, ct):
            client.transaction(json.loads(Path(p.bundle_path).read_text()))
    inbox = tmp_path / "in"
    others = {  # file -> what its ignored reason must say
        _fresh_copy(Path(get_testdata_file("MR_small.dcm")), inbox / "mr.dcm"):
            "route chest-ct: series 1 (MR): Modality MR is not CT",
        _fresh_copy(Path(get_testdata_file("rtdose.dcm")), inbox / "rtdose.dcm"):
            "not an image: radiotherapy object",
        _fresh_copy(Path(get_testdata_file("test-SR.dcm")), inbox / "sr.dcm"):
            "not an image: structured report",
        _fresh_copy(Path(get_testdata_file("CT_small.dcm")), inbox / "localizer.dcm",
                    ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], BodyPartExamined="CHEST"):
            "localizer / scout (ImageType ORIGINAL\\PRIMARY\\LOCALIZER)",
    }
    ct_card = load_card(load_settings(data_dir=tmp_path / "x").ct_card_path())  # type: ignore[arg-type]
    xr_card = load_card(load_settings(data_dir=tmp_path / "x").model_card_path())
    with running_serve(tmp_path, orthanc, fhir_server, {}) as stack:
        studies = sorted(Path(dx.study_dir).glob("*.dcm")) + sorted(Path(ct.study_dir).glob("*.dcm"))
        _storescu(storescu, stack, studies + list(others))
        for patient, route, card in ((dx, "default", xr_card), (ct, "chest-ct", ct_card)):
            job = stack.wait_done(patient.study_instance_uid)
            assert job.state == JobState.DONE, job.error
            assert (job.route, job.model) == (route, f"{card.name} {card.version}")
            srs = _sr_instances(orthanc, patient.study_instance_uid)
            assert len(srs) == 1
            sr = dcmread(io.BytesIO(_orthanc(orthanc, f"/instances/{srs[0]}/file")))  # type: ignore[arg-type]
            assert sr.SOPInstanceUID == job.sr_uid and read_sr(sr).model_name == card.name
            with FhirClient(fhir_server.base_url) as client:
                reports = list(client.search("DiagnosticReport", {"subject": f"Patient/{patient.fhir_id}"}))
            assert len(reports) == 1 and f"model {card.name} " in reports[0]["conclusion"]
        for f, reason in others.items():
            job = _wait_state(stack, dcmread(f).StudyInstanceUID)
            assert job.state == JobState.IGNORED and job.route == "", (f.name, job.state, job.error)
            assert reason in (job.error or ""), (f.name, job.error)
            assert _sr_instances(orthanc, dcmread(f).StudyInstanceUID) == []

        # the PACS routes our SR back to us: recorded, ignored, no second result
        looped = tmp_path / "loop" / "sr.dcm"
        looped.parent.mkdir()
        [our_sr] = _sr_instances(orthanc, dx.study_instance_uid)
        looped.write_bytes(_orthanc(orthanc, f"/instances/{our_sr}/file"))  # type: ignore[arg-type]
        subprocess.run([sys.executable, "-m", "dicom_fusion.service.cli", "send", str(looped.parent), "--port",
                        str(stack.port), "--aet", "TESTPACS"], check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while len(stack.ledger.jobs_for_study(dx.study_instance_uid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        v2 = _wait_state(stack, dx.study_instance_uid)
        assert (v2.version, v2.state) == (2, JobState.IGNORED)
        assert "nothing new for route default" in (v2.error or "")
        assert len(_sr_instances(orthanc, dx.study_instance_uid)) == 1

        counts = studies_by_state(stack.ledger)
        # ignored: MR, RT dose, SR, localizer, and the radiograph study (its latest job: the looped-back SR's)
        assert (counts["done"], counts["ignored"], counts["dead"], counts["failed"]) == (1, 5, 0, 0)
        assert dead_jobs(stack.ledger) == ()
