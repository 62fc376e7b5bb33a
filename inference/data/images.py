"""From the DICOM files of one study to the network's input array.

Three steps, each a function: pick the series the model was trained on (`select_series`, headers only,
so a study of 1 000 slices costs no pixel decoding to reject), decode its pixels in modality units
(`decode_series`, pydicom with the pylibjpeg plugins for JPEG / JPEG-LS / JPEG 2000 / RLE), and
normalise + resize (`prepare_array`, MONAI array transforms built once from the card by
`build_image_transform`; training code wraps the same function so train and serve cannot drift).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from monai.transforms import (
    Compose,
    EnsureType,
    Resize,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Transform,
)
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder

from dicom_fusion.inference.card.model import ImageSpec, InputSelection, ModelCard
from dicom_fusion.inference.errors import ImageDecodeError, NoSuitableSeriesError

PERCENTILES = (0.5, 99.5)
"""Intensity range mapped to [0, 1] when the card has no window: robust to vendor-specific raw ranges."""


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """Network input of one study plus the instances it came from (the SR references them)."""

    array: np.ndarray  # float32, [C, *size]
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    intensity_mean: float
    """Mean of the decoded pixels in modality units, before normalisation (drift item `image.mean`)."""
    intensity_std: float
    """Their standard deviation (drift item `image.std`): normalisation hides a scanner whose scale changed."""


@dataclass(frozen=True)
class ImageFileHeader:
    """What series selection needs from one file, read without its pixel data."""

    path: Path
    series_instance_uid: str
    sop_instance_uid: str
    modality: str
    series_number: int | None
    instance_number: int | None
    slice_position: float | None
    frames: int


# --------------------------------------------------------------------------- series selection


def _int_or_none(value: object) -> int | None:
    """IS/US/DS header values as int; None when absent or not a single number."""
    if value is None:
        return None
    try:
        return int(float(str(value)))
    except (TypeError, ValueError, OverflowError):
        return None


def _slice_position(ds: Dataset) -> float | None:
    """Position along the slice normal; sorting by it orders slices even when InstanceNumber lies."""
    try:
        ori = [float(v) for v in ds.ImageOrientationPatient]
        pos = [float(v) for v in ds.ImagePositionPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(ori) != 6 or len(pos) != 3:
        return None
    normal = np.cross(ori[:3], ori[3:])
    return float(np.dot(normal, pos))


def read_headers(files: Sequence[Path]) -> tuple[list[ImageFileHeader], list[Path]]:
    """Headers of the image instances among `files`, and the files that are not readable DICOM.

    Instances without Rows/Columns (SR, KO, PR) are not images and are left out silently.
    """
    headers: list[ImageFileHeader] = []
    unreadable: list[Path] = []
    for f in files:
        path = Path(f)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            unreadable.append(path)
            continue
        if "Rows" not in ds or "Columns" not in ds or "SeriesInstanceUID" not in ds:
            continue
        headers.append(
            ImageFileHeader(
                path=path,
                series_instance_uid=str(ds.SeriesInstanceUID),
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                modality=str(ds.get("Modality", "")).upper(),
                series_number=_int_or_none(ds.get("SeriesNumber")),
                instance_number=_int_or_none(ds.get("InstanceNumber")),
                slice_position=_slice_position(ds),
                frames=_int_or_none(ds.get("NumberOfFrames")) or 1,
            )
        )
    return headers, unreadable


def _series_key(rule: str, instances: list[ImageFileHeader]) -> tuple[float, ...]:
    number = instances[0].series_number
    number_key = float(number) if number is not None else math.inf
    count = sum(h.frames for h in instances)
    if rule == "lowest_series_number":
        return (number_key, -count)
    return (-count, number_key)  # most_instances: frames count too, a multi-frame series is not "one image"


def select_series(
    headers: Sequence[ImageFileHeader], selection: InputSelection, unreadable: int = 0
) -> list[ImageFileHeader]:
    """The instances of the one series the model reads, per `selection.series_rule`.

    Ties are broken by series number, then by SeriesInstanceUID, so the choice is deterministic.
    """
    groups: dict[str, list[ImageFileHeader]] = defaultdict(list)
    for h in headers:
        if h.modality in selection.modalities:
            groups[h.series_instance_uid].append(h)
    if not groups:
        found = Counter(h.modality or "(none)" for h in headers)
        found_txt = (
            ", ".join(f"{m} ({n} instances)" for m, n in sorted(found.items())) or "no image instances"
        )
        extra = f"; {unreadable} file(s) were not readable DICOM" if unreadable else ""
        raise NoSuitableSeriesError(
            f"no series the model accepts: found {found_txt}{extra}; the model card accepts modalities "
            f"{', '.join(selection.modalities)}. Send a study of an accepted modality, or serve a model "
            "whose "
            "card lists this modality in input.modalities."
        )
    uid = min(groups, key=lambda u: (*_series_key(selection.series_rule, groups[u]), u))
    return groups[uid]


# --------------------------------------------------------------------------- decoding


def _decode_failure(path: Path, ds: Dataset, exc: Exception) -> ImageDecodeError:
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    name = f"{tsyntax.name} ({tsyntax})" if tsyntax is not None else "unknown transfer syntax"
    try:
        decoder = get_decoder(tsyntax) if tsyntax is not None else None
    except NotImplementedError:
        return ImageDecodeError(
            f"{path}: no pixel data decoder exists for transfer syntax {name}; ask the sender to transcode "
            "to Explicit VR Little Endian or a JPEG / JPEG 2000 / RLE syntax"
        )
    if decoder is not None and not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        return ImageDecodeError(
            f"{path}: transfer syntax {name} needs a decoder package that is not installed ({missing}); "
            "install one with `pip install -c constraints.txt pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
            "pylibjpeg-rle`"
        )
    return ImageDecodeError(
        f"{path}: pixel data in {name} could not be decoded ({exc}); the file may be "
        "corrupt or truncated, ask the sender to resend the instance"
    )


def _decode_instance(path: Path) -> tuple[Dataset, np.ndarray]:
    """Pixels of one instance in modality units: [frames?, rows, cols, samples?] float32, bright = high."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ImageDecodeError(
            f"{path}: cannot be read as DICOM ({exc}); ask the sender to resend it"
        ) from exc
    try:
        pixels = ds.pixel_array
    # pydicom raises RuntimeError, ValueError, NotImplementedError... per plugin: all mean "cannot decode"
    except Exception as exc:
        raise _decode_failure(path, ds, exc) from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        pixels = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
        if photometric == "MONOCHROME1":  # 0 = white: invert so that high values are bright everywhere
            pixels = pixels.max() + pixels.min() - pixels
    return ds, np.asarray(pixels, dtype=np.float32)


def _to_channels(pixels: np.ndarray, samples: int, channels: int) -> np.ndarray:
    """[*spatial, samples?] -> [channels, *spatial]; colour becomes luminance for 1-channel models."""
    if samples == 1:
        return np.repeat(pixels[np.newaxis], channels, axis=0)
    if pixels.shape[-1] != samples:
        raise ValueError(f"expected {samples} samples per pixel in the last axis, got shape {pixels.shape}")
    if channels == 1:
        luminance = pixels[..., :3] @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
        return luminance[np.newaxis]
    if channels == samples:
        return np.moveaxis(pixels, -1, 0)
    raise ValueError(f"cannot map {samples} samples per pixel onto a {channels}-channel model")


def _middle(items: Sequence[ImageFileHeader]) -> ImageFileHeader:
    ordered = sorted(
        items,
        key=lambda h: (h.instance_number if h.instance_number is not None else math.inf, h.sop_instance_uid),
    )
    return ordered[(len(ordered) - 1) // 2]


def decode_series(instances: Sequence[ImageFileHeader], spec: ImageSpec) -> tuple[np.ndarray, tuple[str, ...]]:
    """Channel-first float32 pixels of the chosen series and the SOP Instance UIDs used.

    2D: the middle instance by InstanceNumber (middle frame if multi-frame). 3D: the slices sorted
    along the slice normal (ImagePositionPatient), or the frames of the largest multi-frame instance.
    """
    if spec.spatial_dims == 2 or len(instances) == 1 or any(h.frames > 1 for h in instances):
        chosen = (
            _middle(instances)
            if spec.spatial_dims == 2
            else max(instances, key=lambda h: (h.frames, h.sop_instance_uid))
        )
        ds, pixels = _decode_instance(chosen.path)
        samples = int(ds.get("SamplesPerPixel", 1))
        frame_axis = pixels.ndim - (2 if samples == 1 else 3) == 1
        if spec.spatial_dims == 2 and frame_axis:
            pixels = pixels[(pixels.shape[0] - 1) // 2]
        elif spec.spatial_dims == 3 and not frame_axis:
            pixels = pixels[np.newaxis]
        return _to_channels(pixels, samples, spec.channels), (chosen.sop_instance_uid,)
    ordered = sorted(
        instances,
        key=lambda h: (
            h.slice_position if h.slice_position is not None else math.inf,
            h.instance_number if h.instance_number is not None else math.inf,
            h.sop_instance_uid,
        ),
    )
    slices = [(h, *_decode_instance(h.path)) for h in ordered]
    shape = Counter(p.shape for _, _, p in slices).most_common(1)[0][0]
    kept = [(h, ds, p) for h, ds, p in slices if p.shape == shape]  # scouts/localisers of another size
    samples = int(kept[0][1].get("SamplesPerPixel", 1))
    volume = np.stack([p for _, _, p in kept])
    return _to_channels(volume, samples, spec.channels), tuple(h.sop_instance_uid for h, _, _ in kept)


# --------------------------------------------------------------------------- MONAI transforms


def build_image_transform(spec: ImageSpec) -> Callable[[np.ndarray], np.ndarray]:
    """MONAI array transforms for channel-first pixels in modality units -> float32 [C, *size] in [0, 1].

    Intensity first (window or percentiles, clipped), then resize with area interpolation, which
    averages rather than skips pixels when shrinking a 3000-pixel radiograph to 128.
    """
    intensity: Transform
    if spec.window is not None:
        intensity = ScaleIntensityRange(
            a_min=spec.window[0], a_max=spec.window[1], b_min=0.0, b_max=1.0, clip=True
        )
    else:
        intensity = ScaleIntensityRangePercentiles(
            lower=PERCENTILES[0], upper=PERCENTILES[1], b_min=0.0, b_max=1.0, clip=True
        )
    return Compose(
        [
            intensity,
            Resize(spatial_size=spec.size, mode="area"),
            EnsureType(data_type="numpy", dtype=np.float32),
        ]
    )


def prepare_array(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Normalise + resize channel-first pixels [C, *spatial] to the card's input: the one place it happens."""
    if pixels.ndim != spec.spatial_dims + 1:
        raise ValueError(
            f"expected channel-first pixels with {spec.spatial_dims} spatial axes, got shape {pixels.shape}"
        )
    with warnings.catch_warnings():  # a blank image triggers MONAI's "divide by zero" warning; result is 0
        warnings.filterwarnings("ignore", message="Divide by zero")
        out = build_image_transform(spec)(np.asarray(pixels, dtype=np.float32))
    return np.ascontiguousarray(out, dtype=np.float32)


def load_study_image(files: Sequence[Path], card: ModelCard) -> PreparedImage:
    """The network input for a study: select the series, decode it, normalise and resize it.

    Raises NoSuitableSeriesError when no series matches `card.input`, ImageDecodeError when the pixels
    of the chosen series cannot be decoded.
    """
    headers, unreadable = read_headers(files)
    instances = select_series(headers, card.input, unreadable=len(unreadable))
    try:
        pixels, sop_uids = decode_series(instances, card.image)
    except ValueError as exc:
        raise ImageDecodeError(f"series {instances[0].series_instance_uid}: {exc}") from exc
    raw = np.asarray(pixels, dtype=np.float64)
    return PreparedImage(
        array=prepare_array(pixels, card.image),
        series_instance_uid=instances[0].series_instance_uid,
        sop_instance_uids=sop_uids,
        intensity_mean=float(raw.mean()),
        intensity_std=float(raw.std()),
    )


__all__ = [
    "PERCENTILES",
    "ImageFileHeader",
    "PreparedImage",
    "build_image_transform",
    "decode_series",
    "load_study_image",
    "prepare_array",
    "read_headers",
    "select_series",
]
