"""The SR builder: TID 1500 content read back by highdicom, same patient/study as the sources,
byte-for-byte deterministic, and accepted by dciodvfy without errors or patient warnings."""
from __future__ import annotations

import subprocess
from dataclasses import replace
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_fusion.inference.serve.predict import ClassProbability, InferenceResult
from dicom_fusion.service.errors import SRValidationError
from dicom_fusion.service.outputs import concepts
from dicom_fusion.service.outputs.identity import derive_sr_uids, device_observer_uid
from dicom_fusion.service.outputs.sr.build import build_sr, check_sr, read_sr, sr_to_bytes

SNOMED = "http://snomed.info/sct"
WHEN = datetime(2024, 5, 17, 9, 30, 15, 123456)
SR_UID, SERIES_UID = derive_sr_uids("1.2.826.0.1.3680043.8.498.1", "hybridnet", "1.0.0")


def make_result(*, image_only: bool = False, reason: str | None = None) -> InferenceResult:
    malignant = ClassProbability("malignant", "363346000", SNOMED, "Malignant neoplastic disease", 0.8125)
    benign = ClassProbability("benign", "30807003", SNOMED, "Benign", 0.1875)
    return InferenceResult(
        model_name="hybridnet",
        model_version="1.0.0",
        probabilities=(benign, malignant),
        finding=malignant,
        image_only=image_only,
        image_only_reason=reason,
    )


def make_ct(index: int, *, study_uid: str = "1.2.826.0.1.3680043.8.498.1") -> Dataset:
    """A small CT image as a modality writes it, unknown weight and size as 0."""
    series_uid = generate_uid(entropy_srcs=[study_uid, "series"])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(index)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, index
    ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = "Fusion^Test", "DF-0001", "urn:test"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.PatientWeight, ds.PatientSize, ds.PatientAge = 0, 0, ""
    ds.AccessionNumber, ds.StudyID, ds.StudyDate, ds.StudyTime = "ACC42", "1", "20240517", "083000"
    ds.ReferringPhysicianName, ds.Manufacturer = "", "ACME"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(32)
    return ds


@pytest.fixture
def sources() -> list[Dataset]:
    return [make_ct(i) for i in (1, 2, 3)]


def build(sources: list[Dataset], result: InferenceResult | None = None, **kwargs: object) -> Dataset:
    kwargs.setdefault("content_datetime", WHEN)
    return build_sr(sources, result or make_result(), sr_instance_uid=SR_UID, sr_series_uid=SERIES_UID,
                    **kwargs)  # type: ignore[arg-type]


def test_round_trip_through_highdicom(sources: list[Dataset]) -> None:
    result = make_result()
    sr = build(sources, result)
    check_sr(sr, result)
    # and after encoding to a file and reading it back, as the PACS would
    check_sr(pydicom.dcmread(BytesIO(sr_to_bytes(sr))), result)

    reading = read_sr(sr)
    assert [(p.code, p.scheme_designator, p.probability) for p in reading.probabilities] == [
        ("30807003", "SCT", 0.1875), ("363346000", "SCT", 0.8125)]
    assert (reading.finding.code, reading.finding.meaning) == ("363346000", "Malignant neoplastic disease")
    assert (reading.model_name, reading.model_version) == ("hybridnet", "1.0.0")
    assert reading.device_observer_uid == device_observer_uid("hybridnet")
    assert reading.source_sop_instance_uids == tuple(s.SOPInstanceUID for s in sources)
    assert reading.image_only is False and reading.image_only_reason is None


def test_highdicom_sees_finding_evaluation_and_algorithm(sources: list[Dataset]) -> None:
    """The pitfall of docs/architecture.md ("Pitfalls met"): an evaluation named (121071, DCM, "Finding") would be filtered out."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(build(sources))
    (group,) = sr.content.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.name == concepts.FINDING_EVALUATION
    assert evaluation.value == hd.sr.CodedConcept("363346000", "SCT", "Malignant neoplastic disease")
    assert group.finding_type == evaluation.value
    assert {m.unit.value for m in group.get_measurements()} == {"1"}
    assert len(group.source_images) == 3
    assert sr.content.get_observer_contexts(observer_type=concepts.OBSERVER_TYPE_DEVICE)


def test_same_patient_and_study_as_sources(sources: list[Dataset]) -> None:
    sr = build(sources)
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "IssuerOfPatientID", "PatientBirthDate",
                    "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
        assert sr[keyword].value == sources[0][keyword].value, keyword
    assert (sr.SOPInstanceUID, sr.SeriesInstanceUID) == (SR_UID, SERIES_UID)
    assert (sr.Modality, sr.SOPClassUID, sr.SeriesNumber) == ("SR", "1.2.840.10008.5.1.4.1.1.88.34", 999)
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    evidence = {uid for _, _, uid, _ in hd.sr.Comprehensive3DSR.from_dataset(sr).get_evidence()}
    assert evidence == {s.SOPInstanceUID for s in sources}


def test_zero_and_empty_patient_attributes_are_dropped(sources: list[Dataset]) -> None:
    sr = build(sources)
    for keyword in ("PatientWeight", "PatientSize", "PatientAge"):
        assert keyword not in sr, keyword
    assert sources[0].PatientWeight == 0  # the sources are left as they were
    assert "PixelData" in sources[0]


def test_bytes_are_deterministic(sources: list[Dataset]) -> None:
    first = sr_to_bytes(build(sources))
    assert sr_to_bytes(build([make_ct(i) for i in (1, 2, 3)])) == first
    assert sr_to_bytes(build(sources, content_datetime=datetime(2024, 5, 18))) != first
    aware = WHEN.replace(tzinfo=UTC)
    local = aware.astimezone().replace(tzinfo=None)  # DICOM times without an offset are local
    later = build(sources, content_datetime=aware)
    assert str(later.ContentDate) == local.strftime("%Y%m%d")
    assert str(later.ContentTime) == local.strftime("%H%M%S.%f")


def test_an_ensemble_result_states_its_spread_and_why_it_is_indeterminate(sources: list[Dataset]) -> None:
    result = make_result()
    undecided = ClassProbability("indeterminate", "82334004", SNOMED, "Indeterminate", 0.8125)
    why = ("the ensemble's members disagree: the spread of their calibrated probabilities of malignant is 0.21, "
           "above the model's limit of 0.14")
    result = replace(result, finding=undecided, positive_class="malignant", spread=0.21,
                                 uncertainty="ensemble of 5 networks; spread 0.210", indeterminate_reason=why)
    sr = build(sources, result)
    check_sr(sr, result)
    reading = read_sr(sr)
    assert reading.indeterminate
    texts = [str(el.value) for el in sr.iterall() if el.keyword == "TextValue"]
    assert f"{concepts.INDETERMINATE_PREFIX}: {why}; no class is reported, a clinician decides" in texts
    assert f"{concepts.UNCERTAINTY_PREFIX}: ensemble of 5 networks; spread 0.210" in texts
    plain = build(sources, make_result())
    assert not [el for el in plain.iterall() if el.keyword == "TextValue" and concepts.UNCERTAINTY_PREFIX in str(el.value)]


def test_image_only_flag(sources: list[Dataset]) -> None:
    result = make_result(image_only=True, reason="no Patient match in FHIR")
    sr = build(sources, result)
    check_sr(sr, result)
    reading = read_sr(sr)
    assert reading.image_only and reading.image_only_reason == "no Patient match in FHIR"
    with pytest.raises(SRValidationError, match="Image-only flag is True in the SR, False expected"):
        check_sr(sr, make_result())
    no_reason = read_sr(build(sources, make_result(image_only=True)))
    assert no_reason.image_only and no_reason.image_only_reason is None


def test_dciodvfy_accepts_the_sr(sources: list[Dataset], tmp_path: Path, dciodvfy: str) -> None:
    for name, srcs, result in [
        ("synthetic", sources, make_result()),
        ("ct_small", [pydicom.dcmread(get_testdata_file("CT_small.dcm"))], make_result(image_only=True,
                                                                                         reason="FHIR down")),
    ]:
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(sr_to_bytes(build(srcs, result)))
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60,
                             check=False)
        lines = (run.stdout + run.stderr).splitlines()
        assert not [line for line in lines if line.startswith("Error")], lines
        assert not [line for line in lines if "Patient" in line], lines
        assert not [line for line in lines if line.startswith("Warning")], lines


def test_check_sr_reports_what_is_wrong(sources: list[Dataset]) -> None:
    result = make_result()
    with pytest.raises(SRValidationError, match="expected Comprehensive 3D SR Storage"):
        check_sr(sources[0])

    sr = build(sources, result)
    value = sr.ContentSequence[-1].ContentSequence[0].ContentSequence
    num = next(item for item in value if item.ValueType == "NUM")
    num.MeasuredValueSequence[0].FloatingPointValue = 0.5
    with pytest.raises(SRValidationError, match=r"Class #1 \(30807003\) probability is 0.5 in the SR"):
        check_sr(sr, result)
    num.MeasuredValueSequence[0].FloatingPointValue = 1.5
    with pytest.raises(SRValidationError, match=r"has value 1.5; a probability must be in \[0, 1\]"):
        check_sr(sr)

    sr = build(sources, result)
    group = sr.ContentSequence[-1].ContentSequence[0]
    group.ContentSequence = [item for item in group.ContentSequence
                             if not (item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue
                                     == concepts.FINDING_EVALUATION.value)]
    with pytest.raises(SRValidationError, match='Expected 1 qualitative evaluation "Clinical finding", '
                                                'found 0'):
        check_sr(sr)

    other = replace(result, model_version="2.0.0")
    with pytest.raises(SRValidationError, match=r"model_version is '1\.0\.0' in the SR, '2\.0\.0' expected"):
        check_sr(build(sources, result), other)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda s, r: ([], r), ValueError, "No source instances were provided"),
        (lambda s, r: (s[0], r), TypeError, "sequence of pydicom Datasets"),
        (lambda s, r: ([*s, make_ct(9, study_uid="1.2.826.0.1.3680043.8.498.2")], r), ValueError,
         "2 studies"),
        (lambda s, r: (s, replace(r, probabilities=(replace(r.finding, probability=1.5),))), ValueError,
         r"probability 1.5 is not in \[0, 1\]"),
        (lambda s, r: (s, replace(r, finding=replace(r.finding, code="404684003"))), ValueError,
         "is not one of the result's classes"),
        (lambda s, r: (s, replace(r, probabilities=(replace(r.finding, system="urn:x"),))), ValueError,
         'Coding system "urn:x" has no DICOM coding scheme designator'),
        (lambda s, r: (s, replace(r, probabilities=(r.finding, r.finding))), ValueError, "listed twice"),
        (lambda s, r: (s, replace(r, model_name="")), ValueError,
         '"model_name" of the result must not be empty'),
    ],
)
def test_build_sr_rejects_bad_input(sources, change, error, message) -> None:  # type: ignore[no-untyped-def]
    srcs, result = change(sources, make_result())
    with pytest.raises(error, match=message):
        build(srcs, result)


def test_build_sr_rejects_bad_uids(sources: list[Dataset]) -> None:
    with pytest.raises(ValueError, match='"sr_instance_uid" is not a valid DICOM UID'):
        build_sr(sources, make_result(), sr_instance_uid="1.2.abc", sr_series_uid=SERIES_UID)
    with pytest.raises(ValueError, match="must not be the series of a source image"):
        build_sr(sources, make_result(), sr_instance_uid=SR_UID, sr_series_uid=sources[0].SeriesInstanceUID)


def test_derived_uids() -> None:
    assert derive_sr_uids("1.2.3", "m", "1") == derive_sr_uids("1.2.3", "m", "1")
    series, instance = derive_sr_uids("1.2.3", "m", "1")
    series2, instance2 = derive_sr_uids("1.2.3", "m", "1", revision=2)
    assert series == series2
    assert instance not in (instance2, series)
    assert derive_sr_uids("1.2.3", "m", "2")[1] != instance


def test_coded_concepts_from_fhir_systems() -> None:
    assert concepts.coded_concept(SNOMED, "363346000", "Malignant").scheme_designator == "SCT"
    assert concepts.coded_concept("http://loinc.org", "1-8", "x").scheme_designator == "LN"
    assert concepts.coded_concept("SCT", "1", "x").scheme_designator == "SCT"
    assert concepts.fhir_system("SCT") == SNOMED
    with pytest.raises(ValueError, match="has no DICOM coding scheme designator"):
        concepts.coded_concept("http://example.org", "1", "x")
    with pytest.raises(ValueError, match="must not be empty"):
        concepts.coded_concept(SNOMED, " ", "x")
