"""Grad-CAM overlay as a DICOM Secondary Capture, so the radiologist sees in the PACS where the model looked.

The overlay is drawn on what the model read: its prepared input (128² for the default card; for a
volume, the slice that holds the saliency map's peak, so the SC shows where the model looked rather
than an arbitrary slice that may miss the finding), upscaled to at least `DISPLAY_SIZE` pixels so a
viewer shows it at a useful size,
with the saliency map as a jet colour overlay whose opacity follows the saliency (low saliency stays
transparent, the anatomy shows through). Drawing on the prepared input rather than the original pixels
keeps the map and the image registered by construction: the model's resize is the only geometry between
them, and it is undone here the same way for both.

UIDs derive from the SR's (study, model, version, job revision), so a redelivered task stores the same
instance and the PACS keeps one copy.
"""
from __future__ import annotations

from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_fusion.service.outputs.identity import MANUFACTURER, derive_saliency_uids

DISPLAY_SIZE = 512
OPACITY = 0.65
SERIES_NUMBER = 998  # next to the SR's 999


def peak_slice(saliency: np.ndarray) -> int | None:
    """Index (first axis) of the slice holding the saliency map's maximum; None for a 2D map."""
    heat = np.asarray(saliency)
    if heat.ndim < 3:
        return None
    return int(np.unravel_index(int(np.argmax(heat)), heat.shape)[0])


def render_overlay(image: np.ndarray, saliency: np.ndarray, display_size: int = DISPLAY_SIZE) -> np.ndarray:
    """RGB uint8 [H, W, 3]: the first channel of the prepared `image` [C, *size] (values in [0, 1]) with
    `saliency` [*size] (in [0, 1]) as a heat overlay, upscaled by an integer factor to >= display_size.
    A volume [slices, rows, cols] is shown at its `peak_slice`."""
    from matplotlib import colormaps

    base = np.asarray(np.asarray(image)[0], dtype=np.float32)
    heat = np.asarray(saliency, dtype=np.float32)
    if base.shape != heat.shape or base.ndim not in (2, 3):
        raise ValueError(f"saliency {heat.shape} does not match the image {base.shape}")
    k = peak_slice(heat)
    if k is not None:
        base, heat = base[k], heat[k]
    base, heat = np.clip(base, 0.0, 1.0), np.clip(heat, 0.0, 1.0)
    colour = colormaps["jet"](heat)[..., :3]
    alpha = (OPACITY * heat)[..., None]
    rgb = (1.0 - alpha) * base[..., None] + alpha * colour
    factor = max(1, -(-display_size // max(base.shape)))
    rgb = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    out: np.ndarray = np.rint(rgb * 255.0).astype(np.uint8)
    return out


def _orientation(source: Dataset) -> tuple[str, str]:
    """Row and column directions of the overlay: the source's own, else axial (CT/MR) or frontal."""
    value = source.get("PatientOrientation")
    if value is not None and len(value) == 2 and all(str(v) for v in value):
        return str(value[0]), str(value[1])
    return ("L", "P") if source.get("Modality") in ("CT", "MR", "PT") else ("L", "F")


def build_saliency_sc(
    source: Dataset,
    overlay: np.ndarray,
    *,
    sr_instance_uid: str,
    model_name: str,
    model_version: str,
    content_datetime: datetime,
    slice_note: str = "",
) -> Dataset:
    """Secondary Capture (RGB) of `overlay` in the study, patient and frame of `source` (a header of an
    image the model read). `content_datetime` pins every date/time so the same inputs give the same bytes.
    `slice_note` (e.g. "slice 12 of 32") says which slice of a volume input the overlay shows."""
    if overlay.ndim != 3 or overlay.shape[2] != 3 or overlay.dtype != np.uint8:
        raise ValueError(f"overlay must be RGB uint8 [H, W, 3], got {overlay.dtype} {overlay.shape}")
    series_uid, sop_uid = derive_saliency_uids(sr_instance_uid)
    when = content_datetime.astimezone().replace(tzinfo=None) if content_datetime.tzinfo else content_datetime
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=overlay,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=_orientation(source),
        series_description=f"AI saliency {model_name}"[:64],
        manufacturer_model_name=model_name[:64],
        software_versions=model_version[:64],
    )
    sc.ImageType = ["DERIVED", "SECONDARY"]
    on = f"{slice_note} of its input volume" if slice_note else "its input image"
    sc.DerivationDescription = f"Grad-CAM saliency of {model_name} {model_version} on {on}"[:1024]
    sc.BurnedInAnnotation = "NO"
    if "Laterality" not in sc:  # type 2C in General Series: dciodvfy wants it present, empty = unknown
        sc.Laterality = source.get("Laterality", "")
    sc.ContentDate, sc.ContentTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    sc.InstanceCreationDate, sc.InstanceCreationTime = sc.ContentDate, sc.ContentTime
    sc.SeriesDate, sc.SeriesTime = sc.ContentDate, sc.ContentTime
    # highdicom stamps these with datetime.now(); pin them so the same inputs give the same bytes.
    sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture = sc.ContentDate, sc.ContentTime
    for item in sc.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")
    return sc


__all__ = ["build_saliency_sc", "derive_saliency_uids", "peak_slice", "render_overlay"]
