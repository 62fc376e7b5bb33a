"""Model card: the versioned description of a checkpoint that workers load.

The card (TOML, beside the weights) is the single place that says what the model accepts (which
series, how images are normalised, which EHR codes make up the timeline) and what it emits (classes
with SNOMED CT codes, the decision threshold). Everything downstream reads these values from the card
rather than from constants, so a retrained model with other codes or image sizes needs no code change.

The value objects are frozen pydantic dataclasses: pydantic checks types, missing and unknown keys, and
the validators below the rules between values. Their constructors (and `dataclasses.replace`) raise
`ModelCardError`, which is also a `ValueError`, never pydantic's `ValidationError`; `load_card` adds the
card's path to every message so an operator knows which file to fix.
"""

from __future__ import annotations

import hashlib
import math
import os
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import numpy as np
import tomlkit
from pydantic import (
    Strict,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_fusion.inference.card.drift import DriftReference
from dicom_fusion.inference.card.values import (  # noqa: F401 - re-exported: segmenter.py and callers import them here
    Finite,
    PositiveInt,
    Sha256,
    Text,
    _allowed,
    card_value,
    explain,
    omitted_is_none,
)
from dicom_fusion.inference.errors import ModelCardError, WeightsMismatchError

CARD_FORMAT = 1
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ANY = "*"
"""Wildcard for `TimelineFeature.system` / `.code`: count every event of the feature's kind."""

SeriesRule = Literal["most_instances", "lowest_series_number"]
SERIES_RULES: tuple[str, ...] = get_args(SeriesRule)
"""How `load_study_image` picks one series when several match the modalities (see data/images.py)."""
Encoder = Literal["smallcnn", "densenet121", "efficientnet-b0"]
ENCODERS: tuple[str, ...] = get_args(Encoder)
EventKind = Literal["observation", "condition", "medication", "encounter"]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)
REGENERATE_HINT = (
    "regenerate the default model with `dicom-fusion model init --out DIR` "
    "(or `python -m dicom_fusion.inference.nets.hybrid --out DIR --seed 0`), or retrain and rewrite the card"
)

# --------------------------------------------------------------------------- calibration

CalibrationMethod = Literal["identity", "temperature", "platt", "isotonic"]
CALIBRATION_METHODS: tuple[str, ...] = get_args(CalibrationMethod)
_EPS = 1e-7
_PARAMETERS = {
    "identity": (),
    "temperature": ("temperature",),
    "platt": ("slope", "intercept"),
    "isotonic": ("x", "y"),
}
"""The keys each calibration method needs; the others must be absent (a stray key is a mistake)."""


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, _EPS, 1.0 - _EPS)
    return np.asarray(np.log(q) - np.log1p(-q))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)))  # overflow-free logistic


@card_value
class Calibrator:
    """A monotone map from the network's positive-class probability to a calibrated probability.

    identity: unchanged. temperature: sigmoid(logit(p) / temperature), one parameter that only softens
    (T > 1) or sharpens the scores, so the ranking and ROC-AUC are exactly kept. platt: sigmoid(slope *
    logit(p) + intercept), also shifts the scores (slope > 0 keeps the ranking). isotonic: piecewise-linear
    through the points (x, y), x strictly and y weakly increasing; it can fix any monotone miscalibration
    but flat steps tie scores, which can cost a little ROC-AUC. Fitted on out-of-fold predictions by
    `train/calibrate.py`; numpy only, so the card stays loadable without torch.
    """

    method: CalibrationMethod = "identity"
    temperature: Finite | None = None
    slope: Finite | None = None
    intercept: Finite | None = None
    x: tuple[Finite, ...] | None = None
    y: tuple[Finite, ...] | None = None

    @model_validator(mode="after")
    def _parameters(self) -> Calibrator:
        needed = _PARAMETERS[self.method]
        given = {k for k in ("temperature", "slope", "intercept", "x", "y") if getattr(self, k) is not None}
        if missing := [k for k in needed if k not in given]:
            raise ModelCardError(f"calibration method {self.method!r} needs {', '.join(needed)}; "
                                 f"missing: {', '.join(missing)}")
        if extra := sorted(given - set(needed)):
            raise ModelCardError(f"calibration method {self.method!r} takes no {', '.join(extra)} "
                                 f"(it uses {', '.join(needed) or 'no parameter'}); remove the key(s)")
        if self.temperature is not None and self.temperature <= 0:
            raise ModelCardError(f"calibration temperature must be > 0, got {self.temperature}")
        if self.slope is not None and self.slope <= 0:
            raise ModelCardError(f"calibration slope must be > 0 (a negative slope inverts the ranking), "
                                 f"got {self.slope}")
        if self.x is not None and self.y is not None:
            x, y = np.asarray(self.x), np.asarray(self.y)
            if x.size != y.size or x.size < 2:
                raise ModelCardError(f"isotonic calibration needs x and y of one length >= 2, got {x.size} "
                                     f"and {y.size}")
            if np.any(np.diff(x) <= 0) or np.any(np.diff(y) < 0):
                raise ModelCardError("isotonic calibration x must be strictly increasing and y never "
                                     "decreasing (a calibrator must keep the ranking)")
            if x.min() < 0 or x.max() > 1 or y.min() < 0 or y.max() > 1:
                raise ModelCardError("isotonic calibration x and y must be probabilities in [0, 1]")
        return self

    def apply(self, prob: Any) -> np.ndarray:
        """Calibrated probabilities of the positive class, same shape as `prob`."""
        p = np.asarray(prob, dtype=np.float64)
        if self.method == "temperature":
            return _sigmoid(_logit(p) / float(self.temperature))  # type: ignore[arg-type]
        if self.method == "platt":
            return _sigmoid(float(self.slope) * _logit(p) + float(self.intercept))  # type: ignore[arg-type]
        if self.method == "isotonic":
            return np.asarray(np.interp(p, self.x, self.y))  # type: ignore[arg-type]
        return p.copy()

    def describe(self) -> str:
        """One line for the SR, the reports and `dicom-fusion model card`, e.g. "temperature (T = 1.42)"."""
        if self.method == "temperature":
            return f"temperature scaling (T = {self.temperature:.3f})"
        if self.method == "platt":
            return f"Platt scaling (slope {self.slope:.3f}, intercept {self.intercept:+.3f})"
        if self.method == "isotonic":
            return f"isotonic regression ({len(self.x or ())} knots)"
        return "none (identity)"


@card_value
class CalibrationSpec(Calibrator):
    """The `[calibration]` table: the calibrator of the full model (method + its parameters, flat), the
    one of its image-only path (`[calibration.no_ehr]`, the same network without a timeline, scores
    differently), how the threshold was chosen and the indeterminate band.

    `indeterminate` = [low, high] around the threshold: a calibrated probability inside it (inclusive)
    makes the finding "indeterminate" instead of a class (serve/predict.choose_finding). A card without
    this table is uncalibrated (identity) with no band, as before.
    """

    no_ehr: Calibrator | None = None
    target_sensitivity: Finite | None = None
    """The sensitivity on the calibrated out-of-fold predictions the threshold was chosen for; None = fixed."""
    indeterminate: tuple[Finite, Finite] | None = None

    @model_validator(mode="after")
    def _band(self) -> CalibrationSpec:
        if self.target_sensitivity is not None and not 0 < self.target_sensitivity < 1:
            raise ModelCardError(f"calibration.target_sensitivity must be in (0, 1), got {self.target_sensitivity}")
        if self.indeterminate is not None:
            low, high = self.indeterminate
            if not 0 <= low < high <= 1:
                raise ModelCardError(f"calibration.indeterminate must be [low, high] with 0 <= low < high <= 1, "
                                     f"got [{low}, {high}]")
        return self

    def for_path(self, image_only: bool) -> Calibrator:
        """The calibrator of a prediction made with (False) or without (True) the EHR timeline."""
        return self.no_ehr if image_only and self.no_ehr is not None else self


@card_value
class EnsembleSpec:
    """The `[ensemble]` table: the card's own weights are the first member, `members` names the cards of
    the others (paths relative to this card; each a full card of the same network, with its own weights,
    sha256 and timeline scaling: the k fold models of one cross-validation, `train/ensemble.py`).

    The predictor averages the members' raw positive-class probabilities and calibrates the mean with this
    card's `[calibration]`; the spread is the standard deviation of the members' calibrated probabilities.
    `max_spread`: a spread above it makes the finding "indeterminate" (the members disagree), whatever the
    mean; None = spread reported, never decisive.
    """

    members: tuple[Text, ...]
    max_spread: Finite | None = None

    @model_validator(mode="after")
    def _members(self) -> EnsembleSpec:
        if not self.members:
            raise ModelCardError("ensemble.members must name at least one member card (the card's own weights "
                                 "are the first member)")
        for member in self.members:
            if Path(member).is_absolute():
                raise ModelCardError(f"ensemble member {member!r} must be a path relative to the card, so the "
                                     "ensemble folder can be moved as a whole")
        if len(set(self.members)) != len(self.members):
            raise ModelCardError(f"ensemble.members lists a card twice: {list(self.members)}")
        if self.max_spread is not None and not 0 < self.max_spread < 0.5:
            raise ModelCardError(f"ensemble.max_spread must be in (0, 0.5), got {self.max_spread}")
        return self


# --------------------------------------------------------------------------- the card


@card_value
class ClassSpec:
    """One output class; `code` in `system` (SNOMED CT by default) is what the SR and report emit."""

    name: Text
    code: Text
    display: Text
    system: Text = SNOMED


@card_value
class InputSelection:
    """Which series of a study the model reads: accepted modalities and the rule that picks one."""

    modalities: tuple[Text, ...]
    series_rule: SeriesRule = "most_instances"

    @field_validator("modalities")
    @classmethod
    def _upper(cls, modalities: tuple[str, ...]) -> tuple[str, ...]:
        if not modalities:
            raise ModelCardError(
                "input.modalities is empty: list the DICOM Modality values the model accepts"
            )
        return tuple(m.upper() for m in modalities)


def check_grid(spatial_dims: int, size: tuple[int, ...], window: tuple[float, float] | None) -> None:
    """The rules an `[image]` table of either card obeys beyond the types of its values."""
    if len(size) != spatial_dims:
        raise ModelCardError(
            f"image.size {list(size)} has {len(size)} entries but spatial_dims is {spatial_dims}"
        )
    if window is not None and not window[0] < window[1]:
        raise ModelCardError(f"image.window low must be below high, got [{window[0]}, {window[1]}]")


@card_value
class ImageSpec:
    """How pixels become the network input: dimensionality, output size, channels, intensity window.

    `window` is (low, high) in modality units (after rescale slope/intercept, e.g. Hounsfield units);
    None means percentile normalisation (0.5th..99.5th) suited to projection radiographs whose raw
    values vary by vendor. For 3D, `size` is (slices, rows, columns).

    `lesion_channel` makes the classifier segmentation-guided: the card's `segmenter` computes a lesion
    probability map from the prepared image and the network reads it as one more channel
    (`network_channels`, see serve/lesion_channel.py). A CNN trained on a few hundred labels learns "how large is the
    bright blob" poorly; the segmenter learned where lesions are from masks, a different supervision.
    """

    spatial_dims: Literal[2, 3]
    size: tuple[PositiveInt, ...]
    channels: PositiveInt
    window: tuple[Finite, Finite] | None
    encoder: Encoder
    lesion_channel: Annotated[bool, Strict()] = False

    _window_may_be_omitted = omitted_is_none("window")

    @model_validator(mode="after")
    def _grid(self) -> ImageSpec:
        check_grid(self.spatial_dims, self.size, self.window)
        return self

    @property
    def network_channels(self) -> int:
        """Input channels of the network: the prepared image's plus the lesion probability map, if any."""
        return self.channels + int(self.lesion_channel)


@card_value
class TimelineFeature:
    """One column of the timeline tensor.

    `kind` "observation": the mean of the values of Observations coded `system`|`code` in a bin,
    scaled by (v - mean) / std. Other kinds: the number of events of that kind (and code, unless the
    code is "*") in a bin, scaled the same way. `unit` is the UCUM unit the model was trained on: the
    EHR reader (`fhir/events.py`, training and serving alike) converts values to it, and drops (and
    counts) those it cannot convert rather than mixing units. `min` / `max` (optional, observation
    features only, in `unit`) are the plausible bounds of a value: the reader drops and counts values
    outside them (a glucose of 1e308 is a broken interface, not a patient).
    """

    name: Text
    kind: EventKind
    system: Text
    code: Text
    unit: Text | None
    mean: Finite
    std: Finite
    min: Finite | None = None
    max: Finite | None = None

    _unit_may_be_omitted = omitted_is_none("unit")

    @model_validator(mode="after")
    def _rules(self) -> TimelineFeature:
        if self.kind == "observation" and self.code == ANY:
            raise ModelCardError(
                f"timeline feature {self.name!r}: an observation feature needs a concrete code, "
                "averaging values of different codes is meaningless"
            )
        if self.std <= 0:
            raise ModelCardError(f"timeline feature {self.name!r}: std must be > 0, got {self.std}")
        if (self.min is not None or self.max is not None) and self.kind != "observation":
            raise ModelCardError(f"timeline feature {self.name!r}: min/max bound observation values; a "
                                 f"{self.kind} feature counts events and has no value to bound")
        if self.min is not None and self.max is not None and not self.min < self.max:
            raise ModelCardError(f"timeline feature {self.name!r}: min ({self.min}) must be below max "
                                 f"({self.max})")
        return self

    @property
    def is_count(self) -> bool:
        """True for features that count events rather than average observation values."""
        return self.kind != "observation"


@card_value
class TimelineSpec:
    """Which EHR events make up the timeline and how they are binned (see data/timeline_tensor.encode_timeline)."""

    resource_types: tuple[Text, ...]
    window_days: PositiveInt
    bin_days: PositiveInt
    features: tuple[TimelineFeature, ...]

    @model_validator(mode="after")
    def _rules(self) -> TimelineSpec:
        if self.bin_days > self.window_days:
            raise ModelCardError(
                f"timeline.bin_days ({self.bin_days}) is larger than "
                f"timeline.window_days ({self.window_days})"
            )
        if not self.features:
            raise ModelCardError("timeline.features is empty: the LSTM branch needs at least one feature")
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ModelCardError(f"timeline feature names must be unique; repeated: {', '.join(dupes)}")
        return self

    @property
    def n_bins(self) -> int:
        """Bins in the window; the oldest may be partial when window_days is not a multiple of bin_days."""
        return math.ceil(self.window_days / self.bin_days)

    @property
    def target_units(self) -> dict[str, str]:
        """`system|code` -> unit of the observation features: the units the EHR reader converts values to
        (the timeline stage and the training cohort loader pass the same map)."""
        return {f"{f.system}|{f.code}": f.unit for f in self.features if f.unit}

    @property
    def value_bounds(self) -> dict[str, tuple[float | None, float | None]]:
        """`system|code` -> (min, max) of the observation features that declare bounds (in their unit): the
        plausible range the EHR reader keeps, passed beside `target_units`."""
        return {f"{f.system}|{f.code}": (f.min, f.max) for f in self.features
                if f.min is not None or f.max is not None}


@card_value
class ModelCard:
    """A checkpoint's description. `weights` is absolute here and relative to the card in the file."""

    name: Text
    version: Text
    weights: Path
    sha256: Sha256
    input: InputSelection
    image: ImageSpec
    timeline: TimelineSpec
    classes: tuple[ClassSpec, ...]
    positive_class: str
    threshold: Finite
    metrics: dict[str, Finite]
    path: Path
    """Where the card lies; not a key of the file."""
    segmenter: Path | None = None
    """Segmentation card (`card/segmenter.py`) that runs with this model; absolute here, relative to the card
    in the file; None = no lesion segmentation."""
    intended_use: Text | None = None
    """Free text: what the model is for and not for (`dicom-fusion model card`, the review page)."""
    calibration: CalibrationSpec | None = None
    """How raw probabilities become calibrated ones, the threshold's origin, the indeterminate band; None =
    identity, no band (cards written before calibration existed)."""
    drift: DriftReference | None = None
    """Reference distributions of the model's inputs and outputs on its validation cohort (card/drift.py,
    `dicom-fusion model reference`); None = no drift monitoring (cards written before it existed)."""
    ensemble: EnsembleSpec | None = None
    """Further members averaged with this card's weights (`EnsembleSpec`); None = a single network."""

    @field_validator("threshold")
    @classmethod
    def _probability(cls, threshold: float) -> float:
        if not 0.0 <= threshold <= 1.0:
            raise ModelCardError(f"threshold must be a probability in [0, 1], got {threshold}")
        return threshold

    @model_validator(mode="after")
    def _rules(self) -> ModelCard:
        if self.segmenter is None and self.image.lesion_channel:
            raise ModelCardError(
                "image.lesion_channel is true but the card names no `segmenter`; add the segmentation card "
                "the model was trained with (e.g. segmenter = \"../default_segmenter/card.toml\")"
            )
        names = list(self.class_names)
        if len(names) < 2:
            raise ModelCardError("classes must list at least two ClassSpec entries")
        if len(set(names)) != len(names):
            raise ModelCardError(f"class names must be unique, got {names}")
        if self.positive_class not in names:
            raise ModelCardError(f"positive_class {self.positive_class!r} is not one of the classes {names}")
        band = self.calibration.indeterminate if self.calibration is not None else None
        if band is not None and not band[0] <= self.threshold <= band[1]:
            raise ModelCardError(f"calibration.indeterminate [{band[0]}, {band[1]}] must contain the threshold "
                                 f"{self.threshold}: the band is the doubt around the decision")
        return self

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)

    def calibrated(self, prob: Any, *, image_only: bool = False) -> np.ndarray:
        """Calibrated positive-class probabilities for raw ones (identity without a `[calibration]` table)."""
        if self.calibration is None:
            return np.asarray(prob, dtype=np.float64).copy()
        return self.calibration.for_path(image_only).apply(prob)

    @property
    def member_paths(self) -> tuple[Path, ...]:
        """The cards of the further ensemble members, absolute; () for a single network."""
        if self.ensemble is None:
            return ()
        return tuple((self.path.parent / m).resolve() for m in self.ensemble.members)

    def is_indeterminate(self, calibrated_prob: float) -> bool:
        """True when a calibrated positive-class probability lies in the card's indeterminate band."""
        band = self.calibration.indeterminate if self.calibration is not None else None
        return band is not None and band[0] <= calibrated_prob <= band[1]


# --------------------------------------------------------------------------- weights integrity


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights(card: ModelCard) -> None:
    """Refuse a weights file that is missing or is not the one the card was written for.

    A worker that silently served other weights than the card describes would label reports with the
    wrong model version, so this runs before every load.
    """
    if not card.weights.is_file():
        raise ModelCardError(
            f"weights file {card.weights} named by card {card.path} does not exist; restore the checkpoint "
            f"next to the card, or {REGENERATE_HINT}"
        )
    actual = sha256_file(card.weights)
    if actual != card.sha256:
        raise WeightsMismatchError(
            f"weights file {card.weights} has sha256 {actual} but card {card.path} expects {card.sha256}; "
            f"the file was replaced or corrupted. Restore the matching checkpoint, or {REGENERATE_HINT}. "
            "If the new weights are intended, set sha256 in the card to the value above."
        )
    for member in getattr(card, "member_paths", ()):  # an ensemble: every member's card and weights too
        verify_weights(load_card(member))


# --------------------------------------------------------------------------- TOML reading and writing
# Shared with card/segmenter.py: the file is read with tomllib, validated by pydantic and written with
# tomlkit; paths in the file (`path_keys`) are relative to the card, absolute in the value object.

_V = TypeVar("_V")


def read_card(
    cls: type[_V], path: Path, *, what: str, card_format: int, path_keys: tuple[str, ...],
    if_missing: str, if_invalid: str,
) -> _V:
    """Read, check and validate the card of type `cls` at `path`; every error names the file."""
    path = Path(path).resolve()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ModelCardError(f"{what} {path} does not exist; {if_missing}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelCardError(f"{what} {path} is not valid TOML: {exc}{if_invalid}") from exc
    fmt = data.pop("card_format", card_format)
    if fmt != card_format:
        raise ModelCardError(f"{what} {path}: card_format {fmt!r} is not supported by this version "
                             f"(expects {card_format})")
    if "path" in data:
        raise ModelCardError(f"{what} {path}: unknown key(s) in the top level: path (the card's path is "
                             f"where the file lies; allowed: {_allowed(cls, ())})")
    for key in path_keys:
        if isinstance(data.get(key), str):
            data[key] = (path.parent / data[key]).resolve()  # an absolute path in the file stays as it is
    try:
        return TypeAdapter(cls).validate_python({**data, "path": path})
    except ValidationError as exc:
        raise ModelCardError(f"{what} {path}: {explain(exc, cls)}") from exc


def _relative(target: Path, path: Path) -> str:
    try:
        return Path(os.path.relpath(target.resolve(), path.parent)).as_posix()
    except ValueError:  # other drive on Windows
        return target.resolve().as_posix()


def card_text(card: Any, path: Path, *, header: str, card_format: int, path_keys: tuple[str, ...]) -> str:
    """TOML of a card value object, path keys relative to `path`; None is omitted (TOML has no null)."""
    path = Path(path).resolve()
    table = TypeAdapter(type(card)).dump_python(card, mode="json", exclude={"path"}, exclude_none=True)
    for key in path_keys:
        if key in table:
            table[key] = _relative(getattr(card, key), path)
    doc = tomlkit.document()
    doc.add(tomlkit.comment(header))
    doc.add("card_format", card_format)
    doc.update(table)
    return tomlkit.dumps(doc)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file and a rename, so a worker never reads half a card."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_card(path: Path) -> ModelCard:
    """Read and validate a TOML model card; the weights path in the file is relative to the card.

    Does not read the weights (use `verify_weights`), so a card can be inspected on a host that has no
    checkpoint, e.g. by the API listing models.
    """
    return read_card(
        ModelCard, path, what="model card", card_format=CARD_FORMAT, path_keys=("weights", "segmenter"),
        if_missing=f"point the model setting at an existing card.toml, or {REGENERATE_HINT}",
        if_invalid=f"; fix the file or {REGENERATE_HINT}",
    )


def card_to_toml(card: ModelCard, path: Path | None = None) -> str:
    """The TOML text of a card; weights and segmenter paths are relative to `path` (default card.path)."""
    return card_text(
        card, path or card.path, card_format=CARD_FORMAT, path_keys=("weights", "segmenter"),
        header="dicom-fusion model card (see inference/card/model.py). "
               "Weights path is relative to this file.",
    )


def write_card(card: ModelCard, path: Path) -> None:
    """Write `card` as TOML to `path` atomically (temp file + rename), so a worker never reads half a card."""
    write_atomic(path, card_to_toml(card, path))


# --------------------------------------------------------------------------- defaults


DEFAULT_NAME = "dfusion-hybrid-demo"
DEFAULT_VERSION = "0.1.0"
DEFAULT_CLASSES = (
    ClassSpec(name="benign", code="3898006", display="Neoplasm, benign"),
    ClassSpec(name="malignant", code="363346000", display="Malignant neoplastic disease"),
)
DEFAULT_POSITIVE_CLASS = "malignant"
DEFAULT_INTENDED_USE = (
    "Demonstration model of the dicom-fusion pipeline, trained on synthetic data only (dicom-fusion synth): "
    "not for clinical use. It shows how an image and an EHR timeline are fused into a benign/malignant "
    "probability; its figures describe synthetic patients, not people."
)
INDETERMINATE = ClassSpec(name="indeterminate", code="82334004", display="Indeterminate")
"""The finding when the calibrated probability lies in the card's indeterminate band (SNOMED CT 82334004
|Indeterminate (qualifier value)|; the service's outputs/concepts.py and fhir/codes.py name the same code)."""
DEFAULT_INPUT = InputSelection(modalities=("DX", "CR"))  # the synthetic radiographs the default model learns from
DEFAULT_IMAGE = ImageSpec(spatial_dims=2, size=(128, 128), channels=1, window=None, encoder="smallcnn")
DEFAULT_TIMELINE = TimelineSpec(
    resource_types=("Observation", "Condition", "MedicationRequest", "Encounter"),
    window_days=730,
    bin_days=30,
    features=(
        TimelineFeature("glucose", "observation", LOINC, "2345-7", "mg/dL", mean=105.0, std=25.0),
        TimelineFeature("hba1c", "observation", LOINC, "4548-4", "%", mean=5.9, std=0.9),
        TimelineFeature("crp", "observation", LOINC, "1988-5", "mg/L", mean=6.0, std=8.0),
        TimelineFeature("bmi", "observation", LOINC, "39156-5", "kg/m2", mean=27.5, std=5.0),
        TimelineFeature("systolic_bp", "observation", LOINC, "8480-6", "mm[Hg]", mean=128.0, std=17.0),
        TimelineFeature("conditions", "condition", ANY, ANY, None, mean=0.1, std=0.35),
        TimelineFeature("medications", "medication", ANY, ANY, None, mean=0.1, std=0.35),
        TimelineFeature("encounters", "encounter", ANY, ANY, None, mean=0.3, std=0.5),
    ),
)


def default_card(
    *, weights: Path, sha256: str, path: Path, metrics: Mapping[str, float] | None = None
) -> ModelCard:
    """The card of the shipped demo model (2D small CNN, benign vs malignant), for given weights."""
    return ModelCard(
        name=DEFAULT_NAME,
        version=DEFAULT_VERSION,
        weights=weights,
        sha256=sha256,
        input=DEFAULT_INPUT,
        image=DEFAULT_IMAGE,
        timeline=DEFAULT_TIMELINE,
        classes=DEFAULT_CLASSES,
        positive_class=DEFAULT_POSITIVE_CLASS,
        threshold=0.5,
        metrics=dict(metrics or {}),
        path=path,
        intended_use=DEFAULT_INTENDED_USE,
    )


def default_card_path() -> Path:
    """Path of the card shipped as package data (`dicom_fusion.inference/default_model/card.toml`)."""
    return Path(str(resources.files("dicom_fusion.inference").joinpath("default_model", "card.toml")))


__all__ = [
    "ANY",
    "CALIBRATION_METHODS",
    "CARD_FORMAT",
    "DEFAULT_INTENDED_USE",
    "INDETERMINATE",
    "DEFAULT_CLASSES",
    "DEFAULT_IMAGE",
    "DEFAULT_INPUT",
    "DEFAULT_TIMELINE",
    "ENCODERS",
    "EVENT_KINDS",
    "LOINC",
    "SERIES_RULES",
    "SNOMED",
    "CalibrationSpec",
    "Calibrator",
    "ClassSpec",
    "EnsembleSpec",
    "ImageSpec",
    "InputSelection",
    "ModelCard",
    "TimelineFeature",
    "TimelineSpec",
    "card_to_toml",
    "default_card",
    "default_card_path",
    "load_card",
    "sha256_file",
    "verify_weights",
    "write_card",
]
