"""Segmentation card: the versioned description of a segmentation checkpoint (TOML beside the weights).

Same conventions as the classifier's `modelcard.py` (unknown keys are errors, the weights path is relative
to the card, sha256 checked before every load), with what a segmenter needs instead of classes: the
network (`arch`, `features`), its input (`[image]`: spatial_dims, size, channels, optional window, optional
sliding-window `roi_size`), the probability `threshold`, and the segment it draws (`[segment]`: label and
SNOMED CT codes of the segmented property category and type, which the DICOM SEG carries).

The classifier's card enables a segmenter with `segmenter = "<path of this card, relative to it>"`.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_fusion.inference.card.model import (
    SNOMED,
    ImageSpec,
    _build,
    _finite,
    _lines,
    _non_empty,
    _positive_int,
)
from dicom_fusion.inference.errors import ModelCardError

SEG_CARD_FORMAT = 1
ARCHS = ("unet", "segresnet")
"""Network families a card may name (`nets.segnet.build_segnet` builds them); both take `spatial_dims`,
so 2D and 3D share the code."""


@dataclass(frozen=True)
class SegmentLabel:
    """What the segment is: label and SNOMED CT codes (DICOM SEG Segment Sequence, CID 7150 / 7151)."""

    label: str = "Lesion"
    type_code: str = "52988006"
    type_display: str = "Lesion"
    category_code: str = "49755003"
    category_display: str = "Morphologically abnormal structure"
    system: str = SNOMED

    def __post_init__(self) -> None:
        for attr in ("label", "type_code", "type_display", "category_code", "category_display", "system"):
            _non_empty(getattr(self, attr), f"segment.{attr}")


@dataclass(frozen=True)
class SegInput:
    """Network input: like the classifier's `[image]` table (see `modelcard.ImageSpec`), plus `roi_size`,
    the sliding-window size for volumes (omitted = the whole input in one window)."""

    spatial_dims: int
    size: tuple[int, ...]
    channels: int = 1
    window: tuple[float, float] | None = None
    roi_size: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        spec = ImageSpec(self.spatial_dims, self.size, self.channels, self.window, "smallcnn")  # validates
        object.__setattr__(self, "size", spec.size)
        object.__setattr__(self, "window", spec.window)
        if self.roi_size is not None:
            roi = tuple(_positive_int(v, "image.roi_size entries") for v in self.roi_size)
            if len(roi) != self.spatial_dims:
                raise ModelCardError(f"image.roi_size {list(roi)} needs {self.spatial_dims} entries")
            object.__setattr__(self, "roi_size", roi)


@dataclass(frozen=True)
class SegmenterCard:
    name: str
    version: str
    weights: Path
    sha256: str
    arch: str
    features: tuple[int, ...]
    image: SegInput
    threshold: float
    segment: SegmentLabel = field(default_factory=SegmentLabel)
    metrics: dict[str, float] = field(default_factory=dict)
    path: Path = Path("card.toml")

    def __post_init__(self) -> None:
        _non_empty(self.name, "name")
        _non_empty(self.version, "version")
        object.__setattr__(self, "weights", Path(self.weights))
        object.__setattr__(self, "path", Path(self.path))
        sha = str(self.sha256).lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ModelCardError(f"sha256 must be 64 hex digits, got {self.sha256!r}")
        object.__setattr__(self, "sha256", sha)
        if self.arch not in ARCHS:
            raise ModelCardError(f"arch {self.arch!r} is unknown; use one of {', '.join(ARCHS)}")
        object.__setattr__(self, "features", tuple(_positive_int(f, "features") for f in self.features))
        threshold = _finite(self.threshold, "threshold")
        if not 0.0 < threshold < 1.0:
            raise ModelCardError(f"threshold must be in (0, 1), got {threshold}")
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "metrics", {str(k): _finite(v, f"metrics.{k}") for k, v in self.metrics.items()})

    def image_spec(self) -> ImageSpec:
        """The input as the classifier's ImageSpec, for `transforms.prepare_array` (encoder is unused there)."""
        return ImageSpec(self.image.spatial_dims, self.image.size, self.image.channels, self.image.window,
                         "smallcnn")

    def roi(self) -> tuple[int, ...]:
        return self.image.roi_size or self.image.size


def load_segmenter_card(path: Path) -> SegmenterCard:
    """Read and validate a segmentation card; errors name the file."""
    path = Path(path).resolve()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ModelCardError(f"segmentation card {path} does not exist; fix the classifier card's "
                             "`segmenter` key or the model.segmenter setting") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelCardError(f"segmentation card {path} is not valid TOML: {exc}") from exc
    try:
        fmt = data.get("card_format", SEG_CARD_FORMAT)
        if fmt != SEG_CARD_FORMAT:
            raise ModelCardError(f"card_format {fmt!r} is not supported (expects {SEG_CARD_FORMAT})")
        weights = Path(str(data.get("weights", "")))
        top = {k: v for k, v in data.items() if k != "card_format"}
        return _build(
            SegmenterCard, top, "",
            weights=weights if weights.is_absolute() else (path.parent / weights).resolve(),
            image=_build(SegInput, data.get("image", {}), "image"),
            segment=_build(SegmentLabel, data.get("segment", {}), "segment"),
            metrics=dict(data.get("metrics", {})),
            path=path,
        )
    except (ModelCardError, TypeError) as exc:
        raise ModelCardError(f"segmentation card {path}: {exc}") from exc


def segmenter_card_to_toml(card: SegmenterCard, path: Path) -> str:
    path = Path(path).resolve()
    weights = Path(os.path.relpath(card.weights.resolve(), path.parent)).as_posix()
    top: Mapping[str, Any] = {
        "card_format": SEG_CARD_FORMAT, "name": card.name, "version": card.version, "weights": weights,
        "sha256": card.sha256, "arch": card.arch, "features": list(card.features), "threshold": card.threshold,
    }
    image = {"spatial_dims": card.image.spatial_dims, "size": list(card.image.size),
             "channels": card.image.channels,
             "window": list(card.image.window) if card.image.window else None,
             "roi_size": list(card.image.roi_size) if card.image.roi_size else None}
    segment = {k: getattr(card.segment, k) for k in SegmentLabel.__dataclass_fields__}
    out = ["# dicom-fusion segmentation card (see inference/card/segmenter.py). Weights path is relative to this file.",
           *_lines(top), "", "[image]", *_lines(image), "", "[segment]", *_lines(segment),
           "", "[metrics]", *_lines(card.metrics)]
    return "\n".join(out) + "\n"


def write_segmenter_card(card: SegmenterCard, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(segmenter_card_to_toml(card, path), encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["SEG_CARD_FORMAT", "SegInput", "SegmentLabel", "SegmenterCard", "default_segmenter_path", "load_segmenter_card",
           "segmenter_card_to_toml", "write_segmenter_card"]


def default_segmenter_path() -> Path:
    """Path of the segmentation card shipped as package data (`default_segmenter/card.toml`)."""
    from importlib import resources

    return Path(str(resources.files("dicom_fusion.inference").joinpath("default_segmenter", "card.toml")))
