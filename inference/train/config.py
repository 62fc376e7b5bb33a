"""Training settings: the TOML file of `dicom-fusion train --config`, and the card a run starts from.

Every field of `TrainConfig` is a top-level key of the file (README "Model" has the table); unknown keys
are errors, values are validated in the constructor.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_fusion.inference.card.model import (
    CALIBRATION_METHODS,
    DEFAULT_IMAGE,
    DEFAULT_INPUT,
    DEFAULT_NAME,
    DEFAULT_VERSION,
    ENCODERS,
    ImageSpec,
    InputSelection,
    ModelCard,
    default_card,
)
from dicom_fusion.inference.card.segmenter import default_segmenter_path
from dicom_fusion.inference.nets.hybrid import CARD_NAME, WEIGHTS_NAME
from dicom_fusion.inference.serve.lesion_channel import load_guide
from dicom_fusion.inference.train.fitloop import FitSettings


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; every field is a key of the TOML file given to `dicom-fusion train --config`."""

    folds: int = 5
    max_epochs: int = 40
    patience: int = 6
    batch_size: int = 32
    learning_rate: float = 5e-4
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    modality_dropout: float = 0.25
    augment: bool = True
    seed: int = 0
    encoder: str = "smallcnn"
    encoder_weights: Path | None = None
    freeze_encoder: bool = False
    lesion_channel: bool = False
    """Segmentation-guided: the lesion probability map of `segmenter` is one more input channel (serve/lesion_channel.py)."""
    segmenter: Path | None = None
    """Segmentation card of the lesion channel, also the card's `segmenter` (SEG output); None with
    `lesion_channel` = the shipped default segmenter."""
    name: str = DEFAULT_NAME
    version: str = DEFAULT_VERSION
    calibration: str = "auto"
    """Post-hoc calibration fitted on the out-of-fold predictions (train/calibrate.py): "auto" = the method
    with the lowest cross-validated ECE, or one of identity, temperature, platt, isotonic."""
    target_sensitivity: float | None = 0.85
    """The threshold is the highest calibrated probability that keeps this sensitivity on the out-of-fold
    predictions; None = the fixed 0.5."""
    indeterminate_half_width: float = 0.0
    """Calibrated probabilities within threshold ± this are reported "indeterminate"; 0 = no band."""
    ensemble: bool = False
    """Also write the k fold models of the cross-validation as one ensemble card (`<out>/ensemble/card.toml`,
    train/ensemble.py); the single final model stays the card in `<out>`."""
    modalities: tuple[str, ...] = DEFAULT_INPUT.modalities
    """DICOM Modality values the card accepts (its `[input]`); the cohort's studies must have one."""
    series_rule: str = DEFAULT_INPUT.series_rule
    spatial_dims: int = DEFAULT_IMAGE.spatial_dims
    """2: one slice or radiograph; 3: the whole series as a volume (CT)."""
    size: tuple[int, ...] | None = None
    """Network input size, (rows, columns) or (slices, rows, columns); None = 128 x 128 for 2D, and
    required for 3D (a volume has no size that suits every scanner)."""
    window: tuple[float, float] | None = None
    """(low, high) in modality units (Hounsfield units for CT) mapped to [0, 1]; None = percentiles."""

    def __post_init__(self) -> None:
        checks = [
            (self.folds >= 2, "folds must be at least 2"),
            (self.max_epochs >= 1 and self.patience >= 1, "max_epochs and patience must be at least 1"),
            (self.batch_size >= 2, "batch_size must be at least 2"),
            (
                self.learning_rate > 0 and self.weight_decay >= 0,
                "learning_rate must be > 0, weight_decay >= 0",
            ),
            (0 < self.val_fraction < 0.5, "val_fraction must be in (0, 0.5)"),
            (0 <= self.modality_dropout < 1, "modality_dropout must be in [0, 1)"),
            (self.encoder in ENCODERS, f"encoder must be one of {', '.join(ENCODERS)}"),
            (bool(self.name.strip()) and bool(self.version.strip()), "name and version must not be empty"),
            (self.calibration in ("auto", *CALIBRATION_METHODS),
             f"calibration must be auto or one of {', '.join(CALIBRATION_METHODS)}"),
            (self.target_sensitivity is None or 0 < self.target_sensitivity < 1,
             "target_sensitivity must be in (0, 1)"),
            (0 <= self.indeterminate_half_width < 0.5, "indeterminate_half_width must be in [0, 0.5)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"training config: {message}")
        if self.size is None and self.spatial_dims == 3:
            raise ValueError("training config: spatial_dims = 3 needs size = [slices, rows, columns]")
        # TOML gives lists; the card's own validation (ModelCardError, a ValueError) checks the values,
        # so a bad modality list, size or window fails here, before any image is decoded.
        object.__setattr__(self, "modalities", tuple(self.modalities))
        if self.size is not None:
            object.__setattr__(self, "size", tuple(self.size))
        if self.window is not None:
            object.__setattr__(self, "window", tuple(self.window))
        try:
            self.input_selection, self.image_spec  # noqa: B018 - built for their validation
        except ValueError as exc:
            raise ValueError(f"training config: {exc}") from exc
        if self.encoder_weights is not None:
            object.__setattr__(self, "encoder_weights", Path(self.encoder_weights))
        if self.segmenter is not None:
            object.__setattr__(self, "segmenter", Path(self.segmenter).resolve())

    @property
    def input_selection(self) -> InputSelection:
        """The card's `[input]` table: which series of a study the model reads."""
        return InputSelection(modalities=self.modalities, series_rule=self.series_rule)  # type: ignore[arg-type]

    @property
    def image_spec(self) -> ImageSpec:
        """The card's `[image]` table: how the chosen series becomes the network input."""
        return ImageSpec(
            spatial_dims=self.spatial_dims,  # type: ignore[arg-type]
            size=self.size if self.size is not None else DEFAULT_IMAGE.size,
            channels=DEFAULT_IMAGE.channels,
            window=self.window,
            encoder=self.encoder,  # type: ignore[arg-type]
            lesion_channel=self.lesion_channel,
        )

    @property
    def fit_settings(self) -> FitSettings:
        return FitSettings(
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            max_epochs=self.max_epochs,
            patience=self.patience,
            modality_dropout=self.modality_dropout,
            augment=self.augment,
            freeze_encoder=self.freeze_encoder,
        )


def load_train_config(path: Path | None, **overrides: Any) -> TrainConfig:
    """TrainConfig from a TOML file (top-level keys = field names), then `overrides` that are not None.

    Unknown keys are errors, so a typo like `learning_rte` does not silently train with the default.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                values = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"training config {path}: cannot read it as TOML ({exc})") from exc
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"training config {path}: unknown key(s) {', '.join(unknown)}; "
                f"known keys: {', '.join(sorted(known))}"
            )
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise ValueError(f"training config: {exc}") from exc


def base_card(config: TrainConfig, out_dir: Path) -> ModelCard:
    """The default card with the config's name, version, input, image and segmenter; weights not written yet.

    A lesion channel is checked against its segmenter here, before any training time is spent.
    """
    out_dir = Path(out_dir).resolve()
    card = default_card(weights=out_dir / WEIGHTS_NAME, sha256="0" * 64, path=out_dir / CARD_NAME)
    segmenter = config.segmenter
    if segmenter is None and config.lesion_channel:
        segmenter = default_segmenter_path()
    card = dataclasses.replace(
        card,
        name=config.name,
        version=config.version,
        input=config.input_selection,
        image=config.image_spec,
        segmenter=segmenter,
    )
    load_guide(card)
    return card


__all__ = ["TrainConfig", "base_card", "load_train_config"]
