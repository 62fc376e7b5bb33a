"""Lesion segmentation end to end: storescu → dicom-fusion serve with the segmenter enabled (config
`model.segmenter`) → SR + SEG in Orthanc, same study, both dciodvfy-clean, and the SR's lesion area equal
(within 1 %) to the area counted independently from the SEG's pixels x its pixel spacing."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from test_spine import _orthanc, _sr_instances, _storescu, running_serve

from dicom_fusion.inference.card.segmenter import default_segmenter_path
from dicom_fusion.inference.synth.generate import generate_cohort
from dicom_fusion.service.demo.components import Pacs
from dicom_fusion.service.outputs.sr.build import read_sr
from dicom_fusion.service.storage.models import JobState

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def _errors(dciodvfy: str, path: Path) -> list[str]:
    res = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]


def test_study_in_sr_and_seg_out(tmp_path: Path, orthanc: Pacs, storescu: str, dciodvfy: str) -> None:
    patient = generate_cohort(1, tmp_path / "cohort", seed=21, progress=False)[0]
    env = {"DICOM_FUSION_MODEL__EXPLAIN": "false", "DICOM_FUSION_MODEL__SEGMENTER": str(default_segmenter_path())}
    with running_serve(tmp_path, orthanc, None, env) as stack:
        files = sorted(Path(patient.study_dir).glob("*.dcm"))
        _storescu(storescu, stack, files)
        job = stack.wait_done(patient.study_instance_uid)
        assert job.state == JobState.DONE, job.error

        srs = _sr_instances(orthanc, patient.study_instance_uid)
        segs = _sr_instances(orthanc, patient.study_instance_uid, modality="SEG")
        assert len(srs) == 1 and len(segs) == 1
        sr_file, seg_file = tmp_path / "sr.dcm", tmp_path / "seg.dcm"
        sr_file.write_bytes(_orthanc(orthanc, f"/instances/{srs[0]}/file"))  # type: ignore[arg-type]
        seg_file.write_bytes(_orthanc(orthanc, f"/instances/{segs[0]}/file"))  # type: ignore[arg-type]
        assert _errors(dciodvfy, sr_file) == []
        assert _errors(dciodvfy, seg_file) == []

        seg = dcmread(seg_file)
        assert seg.StudyInstanceUID == patient.study_instance_uid
        reading = read_sr(dcmread(sr_file))
        assert len(reading.lesions) == 1
        lesion = reading.lesions[0]
        assert lesion.kind == "area" and lesion.segmentation_sop_instance_uid == seg.SOPInstanceUID
        # independently: SEG pixels (pydicom unpacks the 1-bit frames) x the SEG's own pixel spacing
        spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        area = float(np.count_nonzero(seg.pixel_array)) * float(spacing[0]) * float(spacing[1])
        assert area > 0 and abs(lesion.value - area) <= 0.01 * area
        # and the SEG marks the planted lesion
        truth = np.load(patient.mask_path)
        overlap = np.logical_and(seg.pixel_array > 0, truth > 0).sum() / truth.sum()
        assert overlap > 0.5

        # resending the study stores nothing new (derived UIDs)
        _storescu(storescu, stack, files)
        time.sleep(3)
        assert len(_sr_instances(orthanc, patient.study_instance_uid, modality="SEG")) == 1
