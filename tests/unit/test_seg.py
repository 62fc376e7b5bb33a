"""Lesion segmentation outputs: the DICOM SEG is deterministic, dciodvfy-clean and holds the mask; the SR
gains a TID 1410 (area) / 1411 (volume) group that references the SEG segment and reads back."""
from __future__ import annotations

import math
import subprocess
from datetime import datetime
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from test_sr import make_result

from dicom_fusion.inference.synth.generate import generate_patient
from dicom_fusion.service.errors import SRValidationError
from dicom_fusion.service.outputs.identity import derive_seg_uids, derive_sr_uids
from dicom_fusion.service.outputs.seg.build import (
    SegmentCodes,
    build_segmentation,
    measure_lesion,
    seg_mask,
    source_spacing,
)
from dicom_fusion.service.outputs.sr.build import build_sr, check_sr, read_sr, sr_to_bytes

WHEN = datetime(2024, 5, 17, 9, 30, 15)
LESION = SegmentCodes("Lesion", "52988006", "Lesion", "49755003", "Morphologically abnormal structure")


def _study(tmp_path: Path, modality: str) -> tuple[list[Dataset], np.ndarray]:
    p = generate_patient(1, tmp_path, seed=3, modality=modality)
    files = sorted(p.study_dir.glob("*.dcm"))
    headers = [pydicom.dcmread(f) for f in files]
    mask = np.load(p.mask_path)
    return (headers[:1] if modality == "DX" else headers), mask


@pytest.fixture(scope="module")
def dx(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Dataset], np.ndarray]:
    return _study(tmp_path_factory.mktemp("dx"), "DX")


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Dataset], np.ndarray]:
    return _study(tmp_path_factory.mktemp("ct"), "CT")


def _uids(study: Dataset) -> tuple[str, str]:
    return derive_sr_uids(str(study.StudyInstanceUID), "hybridnet", "1.0.0")


def _seg(sources: list[Dataset], mask: np.ndarray) -> Dataset:
    _, sr_uid = _uids(sources[0])
    return build_segmentation(sources, mask, sr_instance_uid=sr_uid, segment=LESION, model_name="lesionseg",
                              model_version="0.1.0", content_datetime=WHEN)


def test_measure_lesion_uses_pixel_spacing(dx: tuple[list[Dataset], np.ndarray]) -> None:
    sources, _ = dx
    mask = np.zeros((int(sources[0].Rows), int(sources[0].Columns)), np.uint8)
    mask[10:20, 30:35] = 1
    m = measure_lesion(mask, sources)
    row, col = source_spacing(sources)
    assert (m.kind, m.voxels) == ("area", 50)
    assert math.isclose(m.value, 50 * row * col)
    assert m.centroid == (14.5, 32.0) and m.bbox == (10, 30, 19, 34)
    with pytest.raises(ValueError, match="empty"):
        measure_lesion(np.zeros_like(mask), sources)


@pytest.mark.parametrize("kind", ["DX", "CT"])
def test_seg_is_deterministic_dciodvfy_clean_and_holds_the_mask(
    kind: str, dx: tuple[list[Dataset], np.ndarray], ct: tuple[list[Dataset], np.ndarray], tmp_path: Path,
    dciodvfy: str,
) -> None:
    sources, mask = dx if kind == "DX" else ct
    a, b = _seg(sources, mask), _seg(sources, mask)
    assert sr_to_bytes(a) == sr_to_bytes(b)  # redelivery stores the same bytes
    _, sr_uid = _uids(sources[0])
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == derive_seg_uids(sr_uid)
    assert a.StudyInstanceUID == sources[0].StudyInstanceUID and a.PatientID == sources[0].PatientID
    assert a.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    path = tmp_path / "seg.dcm"
    path.write_bytes(sr_to_bytes(a))
    back = pydicom.dcmread(path)
    pixels = seg_mask(back)
    if kind == "DX":
        np.testing.assert_array_equal(pixels, mask)
    else:  # empty slices are omitted: frames map to source slices through the per-frame references
        frames = [str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                  for f in back.PerFrameFunctionalGroupsSequence]
        order = [str(s.SOPInstanceUID) for s in sources]
        rebuilt = np.zeros_like(mask)
        for frame, uid in zip(pixels, frames, strict=True):
            rebuilt[order.index(uid)] = frame
        np.testing.assert_array_equal(rebuilt, mask)
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    assert not [line for line in lines if line.startswith("Error")], lines


@pytest.mark.parametrize("kind", ["DX", "CT"])
def test_sr_lesion_group_round_trip(
    kind: str, dx: tuple[list[Dataset], np.ndarray], ct: tuple[list[Dataset], np.ndarray], tmp_path: Path,
    dciodvfy: str,
) -> None:
    sources, mask = dx if kind == "DX" else ct
    seg = _seg(sources, mask)
    lesion = measure_lesion(mask, sources)
    series_uid, sr_uid = _uids(sources[0])
    result = make_result()
    sr = build_sr(sources, result, sr_instance_uid=sr_uid, sr_series_uid=series_uid, content_datetime=WHEN,
                  segmentation=seg, lesion=lesion)
    back = pydicom.dcmread(BytesIO(sr_to_bytes(sr)))
    check_sr(back, result, expected_lesion=lesion)
    reading = read_sr(back)
    assert len(reading.lesions) == 1
    got = reading.lesions[0]
    assert got.kind == ("area" if kind == "DX" else "volume")
    assert got.segmentation_sop_instance_uid == seg.SOPInstanceUID and got.segment_number == 1
    assert got.finding_code == "52988006" and got.centroid is not None
    spacing = np.prod(source_spacing(sources))
    assert math.isclose(got.value, float(seg_mask(seg).sum()) * spacing, rel_tol=1e-9)
    assert len(reading.probabilities) == 2  # the classification group is still there
    other = measure_lesion(np.pad(mask[..., 1:], [(0, 0)] * (mask.ndim - 1) + [(0, 1)]) | mask, sources)
    if other.value != lesion.value:
        with pytest.raises(SRValidationError, match="Lesion"):
            check_sr(back, result, expected_lesion=other)
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_to_bytes(sr))
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    assert not [line for line in lines if line.startswith("Error")], lines


def test_sr_marks_a_2d_lesion_centre_and_box_as_scoord(dx: tuple[list[Dataset], np.ndarray], tmp_path: Path,
                                                       dciodvfy: str) -> None:
    """2D lesions get SCOORD items a viewer can draw: centroid POINT and bounding-box POLYLINE on the image."""
    from highdicom.sr.utils import find_content_items

    from dicom_fusion.service.outputs import concepts

    sources, mask = dx
    seg = _seg(sources, mask)
    lesion = measure_lesion(mask, sources)
    series_uid, sr_uid = _uids(sources[0])
    sr = build_sr(sources, make_result(), sr_instance_uid=sr_uid, sr_series_uid=series_uid, content_datetime=WHEN,
                  segmentation=seg, lesion=lesion)
    back = pydicom.dcmread(BytesIO(sr_to_bytes(sr)))
    [centre] = find_content_items(back, name=concepts.LESION_CENTER, recursive=True)
    [box] = find_content_items(back, name=concepts.LESION_EXTENT, recursive=True)
    rows, cols = np.nonzero(mask)
    assert np.allclose(centre.GraphicData, [cols.mean() + 0.5, rows.mean() + 0.5])
    xs, ys = np.asarray(box.GraphicData)[0::2], np.asarray(box.GraphicData)[1::2]
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1)
    for item in (centre, box):
        assert item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_to_bytes(sr))
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert not [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
