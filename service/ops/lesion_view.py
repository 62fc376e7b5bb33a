"""The lesion outline on the review page: the source image the SEG was drawn on, windowed to 8 bits, with
the segmentation's outline in colour, as a PNG.

Rendered from what the job delivered (its `seg.dcm` and the source files in `prepared.json`), so the
reviewer sees exactly the segment the SR measures, on the source grid (not the model's resized input).
For a multi-frame SEG the source slice with the largest lesion area is shown.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from pydicom import dcmread

from dicom_fusion.service.outputs.seg.build import seg_mask

OUTLINE = (255, 64, 64)


def _frame_sources(seg: object, frames: int) -> list[str]:
    """The source SOP Instance UID of each stored SEG frame."""
    out = []
    for i in range(frames):
        try:
            fg = seg.PerFrameFunctionalGroupsSequence[i]  # type: ignore[attr-defined]
            out.append(str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID))
        except (AttributeError, IndexError):
            out.append("")
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (a one-pixel contour)."""
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def _to_8bit(pixels: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(pixels, (1, 99)) if pixels.size else (0.0, 1.0)
    scaled = (pixels.astype(np.float32) - lo) / max(float(hi - lo), 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def lesion_png(job_dir: Path) -> bytes | None:
    """The PNG, or None when the job has no SEG (no lesion found, segmentation off) or its sources are gone."""
    from PIL import Image

    seg_path, prepared_path = job_dir / "seg.dcm", job_dir / "prepared.json"
    if not seg_path.exists() or not prepared_path.exists():
        return None
    seg = dcmread(seg_path)
    mask = seg_mask(seg)
    masks = mask[None] if mask.ndim == 2 else mask
    sources = _frame_sources(seg, masks.shape[0])
    best = int(np.argmax(masks.reshape(masks.shape[0], -1).sum(axis=1)))
    files = json.loads(prepared_path.read_text()).get("source_files", [])
    by_uid = {}
    for f in files:
        try:
            by_uid[str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = f
        except (OSError, ValueError, AttributeError):
            continue
    source = by_uid.get(sources[best]) or (files[0] if files else None)
    if source is None:
        return None
    pixels = np.asarray(dcmread(source).pixel_array)
    if pixels.ndim == 3 and pixels.shape[-1] not in (3, 4):
        pixels = pixels[pixels.shape[0] // 2]
    if pixels.ndim == 3:
        pixels = pixels.mean(axis=-1)
    if pixels.shape != masks[best].shape:
        return None  # not on the source grid the SEG says: show nothing rather than a misplaced outline
    gray = _to_8bit(pixels)
    rgb = np.stack([gray] * 3, axis=-1)
    rgb[_outline(masks[best])] = OUTLINE
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()
