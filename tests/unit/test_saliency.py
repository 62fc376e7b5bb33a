"""Explanations reach the PACS and the reports: the Grad-CAM Secondary Capture is a valid DICOM image of
the same study, the SR references it and names the EHR timeline drivers, and all of it reads back."""
from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from test_sr import SR_UID, WHEN, build, make_ct, make_result

from dicom_fusion.fhir.report import build_report_bundle, summary_lines
from dicom_fusion.inference.serve.predict import Driver, InferenceResult
from dicom_fusion.service.errors import SRValidationError
from dicom_fusion.service.outputs.identity import derive_saliency_uids
from dicom_fusion.service.outputs.sc.build import build_saliency_sc, render_overlay
from dicom_fusion.service.outputs.sr.build import check_sr, read_sr, sr_to_bytes


@pytest.fixture
def sources() -> list[Dataset]:
    return [make_ct(i) for i in (1, 2)]


def _explained() -> InferenceResult:
    return replace(make_result(), positive_class="malignant",
                   drivers=(Driver("glucose", 0.1234), Driver("crp", -0.05)))


def _sc(source: Dataset) -> Dataset:
    image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(1, 64, 64)
    saliency = np.zeros((64, 64), np.float32)
    saliency[10:20, 30:40] = 1.0
    return build_saliency_sc(source, render_overlay(image, saliency), sr_instance_uid=SR_UID,
                             model_name="hybridnet", model_version="1.0.0", content_datetime=WHEN)


def test_saliency_overlay_is_rgb_upscaled_and_coloured_where_salient() -> None:
    image = np.full((1, 64, 64), 0.5, np.float32)
    saliency = np.zeros((64, 64), np.float32)
    saliency[0:8, 0:8] = 1.0
    rgb = render_overlay(image, saliency)
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    assert np.ptp(rgb[200:300, 200:300].astype(int), axis=-1).max() == 0  # not salient: grey
    assert np.ptp(rgb[10, 10].astype(int)) > 60  # salient: coloured (jet red over grey)
    with pytest.raises(ValueError, match="does not match"):
        render_overlay(image, np.zeros((32, 32), np.float32))


def test_saliency_sc_is_in_the_study_and_deterministic(sources: list[Dataset]) -> None:
    sc = _sc(sources[0])
    assert sc.StudyInstanceUID == sources[0].StudyInstanceUID and sc.PatientID == sources[0].PatientID
    assert (sc.SeriesInstanceUID, sc.SOPInstanceUID) == derive_saliency_uids(SR_UID)
    assert sc.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert sr_to_bytes(sc) == sr_to_bytes(_sc(sources[0]))


def test_sr_references_the_saliency_sc_and_names_the_drivers(sources: list[Dataset]) -> None:
    result = _explained()
    sc = _sc(sources[0])
    sr = build(sources, result, saliency=sc)
    reading = read_sr(sr)
    assert reading.saliency_sop_instance_uid == sc.SOPInstanceUID
    assert reading.drivers == ("glucose +0.123 toward malignant", "crp -0.050 against malignant")
    check_sr(sr, expected=result)
    with pytest.raises(SRValidationError, match="Timeline drivers"):
        check_sr(sr, expected=replace(result, drivers=()))
    other = make_ct(1, study_uid="1.2.826.0.1.3680043.8.498.2")
    with pytest.raises(ValueError, match="another study"):
        build(sources, result, saliency=_sc(other))


def test_drivers_reach_the_diagnostic_report_text() -> None:
    from dicom_fusion.service.jobs.study_context import StudyFacts, report_content

    facts = StudyFacts.from_dict({"study_uid": "1.2.826.0.1.3680043.8.498.1", "patient_id": "DF-0001",
                                  "issuer": "", "accession_number": "ACC42",
                                  "study_time": "2024-05-17T08:30:00+00:00"})
    content = report_content(_explained(), facts, sr_uid=SR_UID, patient_id=None, system="urn:test")
    assert "EHR timeline driver: glucose +0.123 toward malignant" in summary_lines(content)
    bundle = build_report_bundle(content)
    report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert "EHR drivers: glucose +0.123 toward malignant" in report["conclusion"]


def test_dciodvfy_accepts_sc_and_sr_with_saliency(sources: list[Dataset], tmp_path: Path,
                                                  dciodvfy: str) -> None:
    sc = _sc(sources[0])
    for name, ds in (("sc", sc), ("sr", build(sources, _explained(), saliency=sc))):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(sr_to_bytes(ds))
        assert dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False)
        lines = (run.stdout + run.stderr).splitlines()
        assert not [line for line in lines if line.startswith("Error")], lines


def test_saliency_sc_from_a_source_without_type2_patient_attributes(sources: list[Dataset]) -> None:
    """Modalities leave out PatientSex & co.; the pipeline passes sources through `source_header`."""
    from dicom_fusion.service.outputs.sr.build import source_header

    bare = sources[0]
    for keyword in ("PatientSex", "PatientBirthDate", "ReferringPhysicianName", "AccessionNumber"):
        delattr(bare, keyword)
    sc = _sc(source_header(bare))
    assert sc.PatientSex == "" and sc.PatientID == bare.PatientID
