"""load_study_image: series selection, decoding (incl. compressed syntaxes), MONAI normalisation, errors."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from dicom_fusion.inference.card.model import (
    DEFAULT_INPUT,
    ImageSpec,
    InputSelection,
    ModelCard,
    default_card,
    default_card_path,
    load_card,
)
from dicom_fusion.inference.data import images as transforms
from dicom_fusion.inference.data.images import PreparedImage, load_study_image, prepare_array
from dicom_fusion.inference.errors import ImageDecodeError, NoSuitableSeriesError
from dicom_fusion.inference.synth.generate import SyntheticPatient, generate_cohort


@pytest.fixture(scope="module")
def card() -> ModelCard:
    """The shipped card, reading every modality the bundled test files have (decoding is under test here,
    not which modalities the shipped model accepts)."""
    shipped = load_card(default_card_path())
    return dataclasses.replace(shipped, input=InputSelection(("DX", "CR", "XC", "OT", "CT", "MR")))


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory) -> list[SyntheticPatient]:
    return generate_cohort(3, tmp_path_factory.mktemp("cohort"), seed=5, progress=False)


def _files(p: SyntheticPatient) -> list[Path]:
    return sorted(p.study_dir.glob("*.dcm"))


def _with_card(card: ModelCard, **changes: object) -> ModelCard:
    return dataclasses.replace(card, **changes)


def test_transforms_synth_study(card: ModelCard, patients: list[SyntheticPatient]) -> None:
    for p in patients:
        image = load_study_image(_files(p), card)
        assert isinstance(image, PreparedImage)
        assert image.array.shape == (1, 128, 128) and image.array.dtype == np.float32
        assert 0.0 <= image.array.min() < image.array.max() <= 1.0
        first = pydicom.dcmread(_files(p)[0], stop_before_pixels=True)
        assert image.series_instance_uid == first.SeriesInstanceUID
        assert image.sop_instance_uids == (first.SOPInstanceUID,)  # middle of 1 or 2 = InstanceNumber 1


def test_transforms_intensity_statistics_are_in_modality_units(
    card: ModelCard, patients: list[SyntheticPatient], tmp_path: Path
) -> None:
    """The drift items image.mean / image.std: the decoded pixels before normalisation, so a rescale slope
    that triples them shows there although the network input does not change."""
    files = _files(patients[0])
    image = load_study_image(files, card)
    ds = pydicom.dcmread(files[0])
    pixels = ds.pixel_array.astype(np.float64)
    assert image.intensity_mean == pytest.approx(pixels.mean()) and image.intensity_std == pytest.approx(pixels.std())
    ds.RescaleSlope = "3"
    ds.save_as(tmp_path / "scaled.dcm")
    scaled = load_study_image([tmp_path / "scaled.dcm"], card)
    assert scaled.intensity_mean == pytest.approx(3 * image.intensity_mean)
    assert scaled.intensity_std == pytest.approx(3 * image.intensity_std)
    np.testing.assert_allclose(scaled.array, image.array, atol=1e-5)  # percentile normalisation hides it


def _copy_series(
    src: list[Path], dst: Path, *, n: int, series_number: int, modality: str = "DX"
) -> list[str]:
    """Write n instances of a new series (copies of src[0]) to dst; return SOP UIDs by InstanceNumber."""
    series_uid = generate_uid()
    uids = []
    for i in range(1, n + 1):
        ds = pydicom.dcmread(src[0])
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series_uid, series_number, modality
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i
        uids.append(ds.SOPInstanceUID)
        ds.save_as(dst / f"s{series_number}_{i}.dcm", enforce_file_format=True)
    return uids


def test_transforms_series_rules(card: ModelCard, patients: list[SyntheticPatient], tmp_path: Path) -> None:
    src = _files(patients[0])
    for f in src:
        shutil.copy(f, tmp_path)
    big = _copy_series(src, tmp_path, n=3, series_number=7)
    _copy_series(src, tmp_path, n=5, series_number=8, modality="PR")  # not an accepted modality
    (tmp_path / "notes.txt").write_text("not DICOM")
    files = sorted(tmp_path.iterdir())
    image = load_study_image(files, card)
    assert image.sop_instance_uids == (big[1],)  # most instances, middle by InstanceNumber
    lowest = _with_card(card, input=InputSelection(DEFAULT_INPUT.modalities, "lowest_series_number"))
    chosen = load_study_image(files, lowest)
    assert chosen.series_instance_uid == pydicom.dcmread(src[0]).SeriesInstanceUID  # series 1 < 7


def test_transforms_no_suitable_series_lists_modalities(
    card: ModelCard, patients: list[SyntheticPatient], tmp_path: Path
) -> None:
    (tmp_path / "junk.dcm").write_bytes(b"garbage")
    mr_only = _with_card(card, input=InputSelection(("MR", "CT")))
    with pytest.raises(NoSuitableSeriesError) as info:
        load_study_image([*_files(patients[0]), tmp_path / "junk.dcm"], mr_only)
    text = str(info.value)
    assert "DX (" in text and "MR, CT" in text and "1 file(s) were not readable" in text
    with pytest.raises(NoSuitableSeriesError, match="no image instances"):
        load_study_image([], card)


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
)
def test_transforms_lossless_syntaxes_decode_identically(card: ModelCard, name: str) -> None:
    reference = load_study_image([Path(get_testdata_file("MR_small.dcm"))], card)
    compressed = load_study_image([Path(get_testdata_file(name))], card)
    np.testing.assert_allclose(compressed.array, reference.array, atol=1e-6)


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "JPGExtended.dcm"])
def test_transforms_bundled_jpeg_files(card: ModelCard, name: str) -> None:
    nm = _with_card(card, input=InputSelection(("NM",)))
    image = load_study_image([Path(get_testdata_file(name))], nm)
    assert image.array.shape == (1, 128, 128) and image.array.std() > 0


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # a quirk of that bundled file
def test_transforms_rgb_jpeg_becomes_one_channel(card: ModelCard) -> None:
    image = load_study_image([Path(get_testdata_file("SC_rgb_jpeg.dcm"))], card)  # OT, RGB, JPEG baseline
    assert image.array.shape == (1, 128, 128)
    three = _with_card(card, image=dataclasses.replace(card.image, channels=3))
    assert load_study_image([Path(get_testdata_file("SC_rgb_jpeg.dcm"))], three).array.shape == (3, 128, 128)


def _broken_j2k(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    path = tmp_path / "broken.dcm"
    ds.save_as(path)
    return path


def test_transforms_decode_error_names_transfer_syntax(card: ModelCard, tmp_path: Path) -> None:
    with pytest.raises(
        ImageDecodeError, match=r"JPEG 2000 Image Compression \(Lossless Only\).*could not be decoded"
    ):
        load_study_image([_broken_j2k(tmp_path)], card)


def test_transforms_decode_error_on_damaged_bundled_file(card: ModelCard) -> None:
    nm = _with_card(card, input=InputSelection(("NM",)))
    with pytest.raises(ImageDecodeError, match=r"JPEG Extended \(Process 2 and 4\).*could not be decoded"):
        load_study_image([Path(get_testdata_file("JPEG-lossy.dcm"))], nm)  # pydicom's known-bad JPEG


def test_transforms_decode_error_names_missing_package(
    card: ModelCard, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NoPlugins:
        is_available = False
        missing_dependencies = ("pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0",)

    monkeypatch.setattr(transforms, "get_decoder", lambda uid: NoPlugins())
    with pytest.raises(ImageDecodeError) as info:
        load_study_image([_broken_j2k(tmp_path)], card)
    assert "pylibjpeg-openjpeg" in str(info.value) and "pip install -c constraints.txt" in str(info.value)
    assert str(JPEG2000Lossless) in str(info.value)


def _ct_slice(
    path: Path, series_uid: str, z: float, number: int, value: int, photometric: str = "MONOCHROME2"
) -> str:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", series_uid
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, number
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, z]
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    pixels = np.full((16, 16), value, np.uint16)
    pixels[:, :8] = 0  # half black, so every slice has contrast
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds.SOPInstanceUID


def test_transforms_3d_stacks_slices_by_position(card: ModelCard, tmp_path: Path) -> None:
    series = generate_uid()
    zs = [30.0, 10.0, 50.0, 20.0, 40.0]  # InstanceNumber order disagrees with position order
    uids = {
        z: _ct_slice(tmp_path / f"{i}.dcm", series, z, number=i, value=int(z * 40))
        for i, z in enumerate(zs, 1)
    }
    spec = ImageSpec(spatial_dims=3, size=(5, 8, 8), channels=1, window=(-1024.0, 1100.0), encoder="smallcnn")
    image = load_study_image(sorted(tmp_path.iterdir()), _with_card(card, image=spec))
    assert image.array.shape == (1, 5, 8, 8)
    assert image.sop_instance_uids == tuple(uids[z] for z in sorted(zs))
    right_half = image.array[0, :, :, 4:].mean(axis=(1, 2))
    assert np.all(np.diff(right_half) > 0)  # intensities follow the z order


def test_transforms_monochrome1_is_inverted(card: ModelCard, tmp_path: Path) -> None:
    series = generate_uid()
    _ct_slice(tmp_path / "m2.dcm", series, 0.0, 1, 3000)
    _ct_slice(tmp_path / "m1.dcm", generate_uid(), 0.0, 1, 3000, photometric="MONOCHROME1")
    spec = dataclasses.replace(card.image, size=(16, 16), window=(-1024.0, 1976.0))
    c = _with_card(card, image=spec)
    m2 = load_study_image([tmp_path / "m2.dcm"], c).array
    m1 = load_study_image([tmp_path / "m1.dcm"], c).array
    np.testing.assert_allclose(m1, m2[:, :, ::-1], atol=1e-6)


def test_transforms_prepare_array_checks_dims() -> None:
    spec = ImageSpec(spatial_dims=2, size=(32, 32), channels=1, window=None, encoder="smallcnn")
    out = prepare_array(np.random.default_rng(0).random((1, 50, 70)), spec)
    assert out.shape == (1, 32, 32) and out.dtype == np.float32
    assert not prepare_array(np.zeros((1, 10, 10)), spec).any()  # blank image: no NaN, no warning
    with pytest.raises(ValueError, match="channel-first"):
        prepare_array(np.zeros((50, 70)), spec)


def test_transforms_default_card_helper_matches(tmp_path: Path) -> None:
    card = load_card(default_card_path())
    built = default_card(weights=card.weights, sha256=card.sha256, path=card.path)
    # The shipped model is trained (README "Model"): its timeline scaler was fitted on the training
    # cohort, its card carries the cross-validated metrics, the calibration and the threshold chosen on
    # the out-of-fold predictions and the drift reference of a held-out cohort, and it reads the
    # segmenter's lesion channel (README "Model"); everything else is the helper's.
    guided = dataclasses.replace(built.image, lesion_channel=True)
    assert card.segmenter is not None and card.calibration is not None and card.drift is not None
    assert dataclasses.replace(
        built, image=guided, timeline=card.timeline, metrics=card.metrics, segmenter=card.segmenter,
        calibration=card.calibration, threshold=card.threshold, drift=card.drift,
    ) == card
    assert dataclasses.replace(built.timeline, features=card.timeline.features) == card.timeline
    assert [(f.name, f.kind, f.system, f.code, f.unit) for f in built.timeline.features] == [
        (f.name, f.kind, f.system, f.code, f.unit) for f in card.timeline.features
    ]
