"""Segmentation card: the versioned description of a segmentation checkpoint (TOML beside the weights).

Same conventions as the classifier's card (`card/model.py`: pydantic value objects, unknown keys are
errors, the weights path is relative to the card, sha256 checked before every load), with what a segmenter
needs instead of classes: the network (`arch`, `features`), its input (`[image]`: spatial_dims, size,
channels, optional window, optional sliding-window `roi_size`), the probability `threshold`, and the
segment it draws (`[segment]`: label and SNOMED CT codes of the segmented property category and type,
which the DICOM SEG carries).

The classifier's card enables a segmenter with `segmenter = "<path of this card, relative to it>"`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from dicom_fusion.inference.card.model import (
    SNOMED,
    Finite,
    ImageSpec,
    PositiveInt,
    Sha256,
    Text,
    card_text,
    card_value,
    check_grid,
    read_card,
    write_atomic,
)
from dicom_fusion.inference.errors import ModelCardError

SEG_CARD_FORMAT = 1
Arch = Literal["unet", "segresnet"]
ARCHS: tuple[str, ...] = get_args(Arch)
"""Network families a card may name (`nets.segnet.build_segnet` builds them); both take `spatial_dims`,
so 2D and 3D share the code."""
_PATH_KEYS = ("weights",)


@card_value
class SegmentLabel:
    """What the segment is: label and SNOMED CT codes (DICOM SEG Segment Sequence, CID 7150 / 7151)."""

    label: Text = "Lesion"
    type_code: Text = "52988006"
    type_display: Text = "Lesion"
    category_code: Text = "49755003"
    category_display: Text = "Morphologically abnormal structure"
    system: Text = SNOMED


@card_value
class SegInput:
    """Network input: like the classifier's `[image]` table (see `model.ImageSpec`), plus `roi_size`,
    the sliding-window size for volumes (omitted = the whole input in one window)."""

    spatial_dims: Literal[2, 3]
    size: tuple[PositiveInt, ...]
    channels: PositiveInt = 1
    window: tuple[Finite, Finite] | None = None
    roi_size: tuple[PositiveInt, ...] | None = None

    @model_validator(mode="after")
    def _grid(self) -> SegInput:
        check_grid(self.spatial_dims, self.size, self.window)
        if self.roi_size is not None and len(self.roi_size) != self.spatial_dims:
            raise ModelCardError(f"image.roi_size {list(self.roi_size)} needs {self.spatial_dims} entries")
        return self


@card_value
class SegmenterCard:
    name: Text
    version: Text
    weights: Path
    sha256: Sha256
    arch: Arch
    features: tuple[PositiveInt, ...]
    image: SegInput
    threshold: Finite
    segment: SegmentLabel = Field(default_factory=SegmentLabel)
    metrics: dict[str, Finite] = Field(default_factory=dict)
    path: Path = Path("card.toml")

    @field_validator("threshold")
    @classmethod
    def _probability(cls, threshold: float) -> float:
        if not 0.0 < threshold < 1.0:
            raise ModelCardError(f"threshold must be in (0, 1), got {threshold}")
        return threshold

    def image_spec(self) -> ImageSpec:
        """The input as the classifier's ImageSpec, for `transforms.prepare_array` (encoder unused there)."""
        return ImageSpec(self.image.spatial_dims, self.image.size, self.image.channels, self.image.window,
                         "smallcnn")

    def roi(self) -> tuple[int, ...]:
        return self.image.roi_size or self.image.size


def load_segmenter_card(path: Path) -> SegmenterCard:
    """Read and validate a segmentation card; errors name the file."""
    return read_card(
        SegmenterCard, path, what="segmentation card", card_format=SEG_CARD_FORMAT, path_keys=_PATH_KEYS,
        if_missing="fix the classifier card's `segmenter` key or the model.segmenter setting", if_invalid="",
    )


def segmenter_card_to_toml(card: SegmenterCard, path: Path) -> str:
    return card_text(
        card, path, card_format=SEG_CARD_FORMAT, path_keys=_PATH_KEYS,
        header="dicom-fusion segmentation card (see inference/card/segmenter.py). Weights path is relative "
               "to this file.",
    )


def write_segmenter_card(card: SegmenterCard, path: Path) -> None:
    write_atomic(path, segmenter_card_to_toml(card, path))


def default_segmenter_path() -> Path:
    """Path of the segmentation card shipped as package data (`default_segmenter/card.toml`)."""
    return Path(str(resources.files("dicom_fusion.inference").joinpath("default_segmenter", "card.toml")))


__all__ = ["ARCHS", "SEG_CARD_FORMAT", "SegInput", "SegmentLabel", "SegmenterCard", "default_segmenter_path",
           "load_segmenter_card", "segmenter_card_to_toml", "write_segmenter_card"]
