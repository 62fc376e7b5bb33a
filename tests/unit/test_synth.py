"""Synthetic cohort: valid DICOM, valid FHIR transaction Bundles, matching identifiers, determinism."""

from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, RLELossless
from timeline_events import Event

from dicom_fusion.inference.card.model import DEFAULT_TIMELINE
from dicom_fusion.inference.data.timeline_tensor import encode_timeline
from dicom_fusion.inference.synth.generate import MRN_SYSTEM, SyntheticPatient, generate_cohort

N = 4


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SyntheticPatient]]:
    out = tmp_path_factory.mktemp("cohort")
    return out, generate_cohort(N, out, seed=3, progress=False)


def _bundle(p: SyntheticPatient) -> dict:
    return json.loads(p.bundle_path.read_text())


def test_synth_layout_and_csv(cohort: tuple[Path, list[SyntheticPatient]]) -> None:
    out, patients = cohort
    assert [p.patient_id for p in patients] == [f"SYN{i:05d}" for i in range(1, N + 1)]
    with open(out / "cohort.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["patient_id"] for r in rows] == [p.patient_id for p in patients]
    assert list(rows[0])[:3] == ["patient_id", "label", "study_uid"]
    for row, p in zip(rows, patients, strict=True):
        assert int(row["label"]) == p.label and row["study_uid"] == p.study_instance_uid
        assert (
            p.study_dir == out / p.patient_id / "study"
            and p.bundle_path == out / p.patient_id / "bundle.json"
        )
        assert 1 <= len(list(p.study_dir.glob("*.dcm"))) <= 2


def test_synth_dicom_is_valid_dx(cohort: tuple[Path, list[SyntheticPatient]]) -> None:
    _, patients = cohort
    for p in patients:
        for path in sorted(p.study_dir.glob("*.dcm")):
            ds = pydicom.dcmread(path)  # raises on a missing preamble / file meta
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.SOPClassUID == DigitalXRayImageStorageForPresentation
            assert ds.StudyInstanceUID == p.study_instance_uid
            for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
                assert uid.is_valid and len(uid) <= 64
            assert ds.Modality == "DX" and ds.PresentationIntentType == "FOR PRESENTATION"
            assert ds.PatientID == p.patient_id and ds.IssuerOfPatientID == MRN_SYSTEM
            assert str(ds.PatientName) == f"SYNTH^PATIENT{int(p.patient_id[3:]):04d}"
            assert ds.PatientSex in ("M", "F") and len(ds.PatientBirthDate) == 8
            assert ds.BodyPartExamined in ("CHEST", "SKIN") and ds.AccessionNumber
            assert ds.StudyDate == p.study_time.strftime("%Y%m%d")
            assert "PatientWeight" not in ds
            assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PhotometricInterpretation) == (
                256,
                256,
                16,
                "MONOCHROME2",
            )
            pixels = ds.pixel_array
            assert pixels.dtype == np.uint16 and pixels.max() < 4096 and pixels.std() > 0


def test_synth_bundle_matches_dicom_identity(cohort: tuple[Path, list[SyntheticPatient]]) -> None:
    _, patients = cohort
    for p in patients:
        bundle = _bundle(p)
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
        patient = bundle["entry"][0]["resource"]
        assert patient["resourceType"] == "Patient" and patient["id"] == p.fhir_id
        assert {"system": MRN_SYSTEM, "value": p.patient_id}.items() <= patient["identifier"][0].items()
        ds = pydicom.dcmread(next(p.study_dir.glob("*.dcm")), stop_before_pixels=True)
        assert patient["birthDate"] == datetime.strptime(ds.PatientBirthDate, "%Y%m%d").date().isoformat()
        assert patient["gender"] == {"M": "male", "F": "female"}[ds.PatientSex]
        ids = set()
        for entry in bundle["entry"]:
            res = entry["resource"]
            assert entry["request"] == {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}
            ids.add(f"{res['resourceType']}/{res['id']}")
            if res["resourceType"] != "Patient":
                assert res["subject"] == {"reference": f"Patient/{p.fhir_id}"}
        assert len(ids) == len(bundle["entry"])
        kinds = {e["resource"]["resourceType"] for e in bundle["entry"]}
        assert {"Patient", "Encounter", "Observation"} <= kinds


def test_synth_bundle_validates_as_fhir_r4(cohort: tuple[Path, list[SyntheticPatient]]) -> None:
    bundle_model = pytest.importorskip("fhir.resources.R4B.bundle")
    _, patients = cohort
    for p in patients:
        bundle_model.Bundle.model_validate(_bundle(p))


def _events(bundle: dict) -> list[Event]:
    out = []
    for entry in bundle["entry"]:
        r = entry["resource"]
        if r["resourceType"] == "Observation":
            c = r["code"]["coding"][0]
            out.append(
                Event(
                    "observation",
                    c["system"],
                    c["code"],
                    datetime.fromisoformat(r["effectiveDateTime"]),
                    r["valueQuantity"]["value"],
                    r["valueQuantity"]["unit"],
                )
            )
        elif r["resourceType"] == "Encounter":
            out.append(Event("encounter", "", "AMB", datetime.fromisoformat(r["period"]["start"]), None))
    return out


def test_synth_timeline_uses_card_codes(cohort: tuple[Path, list[SyntheticPatient]]) -> None:
    _, patients = cohort
    for p in patients:
        tensor = encode_timeline(_events(_bundle(p)), p.study_time, DEFAULT_TIMELINE)
        assert tensor is not None and tensor.length >= 1
        observed = tensor.mask[: tensor.length, :5].sum(axis=0)
        assert observed.sum() > 0  # LOINC codes and units of the card match what synth writes


def test_synth_is_deterministic_and_seed_dependent(
    tmp_path: Path, cohort: tuple[Path, list[SyntheticPatient]]
) -> None:
    _, first = cohort
    again = generate_cohort(2, tmp_path / "again", seed=3, progress=False)
    other = generate_cohort(1, tmp_path / "other", seed=4, progress=False)
    for a, b in zip(first[:2], again, strict=True):
        assert (a.study_instance_uid, a.label, a.study_time) == (b.study_instance_uid, b.label, b.study_time)
        assert a.bundle_path.read_bytes() == b.bundle_path.read_bytes()
        files_a, files_b = sorted(a.study_dir.glob("*.dcm")), sorted(b.study_dir.glob("*.dcm"))
        for fa, fb in zip(files_a, files_b, strict=True):
            assert fa.read_bytes() == fb.read_bytes()
    assert other[0].study_instance_uid != first[0].study_instance_uid


def test_synth_labels_are_imbalanced_but_both_present(tmp_path: Path) -> None:
    patients = generate_cohort(40, tmp_path, seed=11, progress=False)
    positive = sum(p.label for p in patients) / len(patients)
    assert 0.1 <= positive <= 0.55


def test_synth_compressed_transfer_syntax(
    tmp_path: Path, cohort: tuple[Path, list[SyntheticPatient]]
) -> None:
    _, plain = cohort
    rle = generate_cohort(1, tmp_path, seed=3, progress=False, transfer_syntax=RLELossless)
    a = pydicom.dcmread(next(plain[0].study_dir.glob("*.dcm")))
    b = pydicom.dcmread(next(rle[0].study_dir.glob("*.dcm")))
    assert b.file_meta.TransferSyntaxUID == RLELossless
    assert a.SOPInstanceUID == b.SOPInstanceUID
    np.testing.assert_array_equal(a.pixel_array, b.pixel_array)


def test_synth_rejects_empty_cohort(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        generate_cohort(0, tmp_path, seed=0, progress=False)


def test_synth_mask_marks_the_planted_lesion(cohort: tuple[Path, list[SyntheticPatient]]) -> None:
    """mask.npy is the exact lesion of the image the model reads: brighter inside than in a ring around it."""
    out, patients = cohort
    for p in patients:
        assert p.mask_path == out / p.patient_id / "mask.npy"
        mask = np.load(p.mask_path).astype(bool)
        first = sorted(p.study_dir.glob("*.dcm"))[0]
        pixels = pydicom.dcmread(first).pixel_array.astype(float)
        assert mask.shape == pixels.shape and mask.sum() >= 20 and mask.mean() < 0.15
        from scipy.ndimage import binary_dilation

        ring = binary_dilation(mask, iterations=6) & ~binary_dilation(mask, iterations=2)
        assert pixels[mask].mean() > pixels[ring].mean() + 40


def test_synth_ct_volume_option(tmp_path: Path) -> None:
    """--modality CT: one axial series ordered by position, HU rescale, the nodule's mask in slice order."""
    from dicom_fusion.inference.card.model import ImageSpec, InputSelection, default_card
    from dicom_fusion.inference.data.images import load_study_image
    from dicom_fusion.inference.synth.generate import CT_SHAPE

    (p,) = generate_cohort(1, tmp_path, seed=5, progress=False, modality="CT")
    files = sorted(p.study_dir.glob("*.dcm"))
    assert len(files) == CT_SHAPE[0]
    datasets = [pydicom.dcmread(f) for f in files]
    assert {ds.Modality for ds in datasets} == {"CT"} and len({ds.SeriesInstanceUID for ds in datasets}) == 1
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z == sorted(z) and [ds.InstanceNumber for ds in datasets] == list(range(1, CT_SHAPE[0] + 1))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    mask = np.load(p.mask_path).astype(bool)
    assert mask.shape == CT_SHAPE and mask.sum() > 50
    assert hu[mask].mean() > -200 and np.median(hu[~mask]) < -500  # soft-tissue nodule in air/lung
    card = default_card(weights=tmp_path / "w.pt", sha256="0" * 64, path=tmp_path / "card.toml")
    card3d = type(card)(**{**card.__dict__, "image": ImageSpec(spatial_dims=3, size=(32, 64, 64), channels=1,
                                                                encoder="smallcnn", window=(-1000.0, 400.0)),
                           "input": InputSelection(("CT",))})
    prepared = load_study_image(files, card3d)
    assert prepared.array.shape == (1, 32, 64, 64)
    with pytest.raises(ValueError, match="modality"):
        generate_cohort(1, tmp_path / "x", seed=5, progress=False, modality="MR")
