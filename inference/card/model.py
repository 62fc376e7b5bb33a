"""Model card: the versioned description of a checkpoint that workers load.

The card (TOML, beside the weights) is the single place that says what the model accepts (which
series, how images are normalised, which EHR codes make up the timeline) and what it emits (classes
with SNOMED CT codes, the decision threshold). Everything downstream reads these values from the card
rather than from constants, so a retrained model with other codes or image sizes needs no code change.

The value objects validate themselves in their constructors (raising `ModelCardError`, which is also a
`ValueError`); `load_card` adds the card's path to every message so an operator knows which file to fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from dicom_fusion.inference.errors import ModelCardError, WeightsMismatchError

CARD_FORMAT = 1
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ANY = "*"
"""Wildcard for `TimelineFeature.system` / `.code`: count every event of the feature's kind."""

SERIES_RULES = ("most_instances", "lowest_series_number")
"""How `load_study_image` picks one series when several match the modalities (see transforms.py)."""
ENCODERS = ("smallcnn", "densenet121", "efficientnet-b0")
EVENT_KINDS = ("observation", "condition", "medication", "encounter")
_T = TypeVar("_T")
REGENERATE_HINT = (
    "regenerate the default model with `dicom-fusion model init --out DIR` "
    "(or `python -m dicom_fusion.inference.nets.hybrid --out DIR --seed 0`), or retrain and rewrite the card"
)


def _tuple_of_str(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ModelCardError(f"{what} must be a list of strings, got {value!r}")
    out = tuple(value)
    if not all(isinstance(v, str) and v for v in out):
        raise ModelCardError(f"{what} must hold non-empty strings, got {value!r}")
    return out


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelCardError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelCardError(f"{what} must be a positive integer, got {value!r}")
    return value


def _non_empty(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ModelCardError(f"{what} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class ClassSpec:
    """One output class; `code` in `system` (SNOMED CT by default) is what the SR and report emit."""

    name: str
    code: str
    display: str
    system: str = SNOMED

    def __post_init__(self) -> None:
        for attr in ("name", "code", "display", "system"):
            _non_empty(getattr(self, attr), f"class {attr}")


@dataclass(frozen=True)
class InputSelection:
    """Which series of a study the model reads: accepted modalities and the rule that picks one."""

    modalities: tuple[str, ...]
    series_rule: str = "most_instances"

    def __post_init__(self) -> None:
        mods = _tuple_of_str(self.modalities, "input.modalities")
        if not mods:
            raise ModelCardError(
                "input.modalities is empty: list the DICOM Modality values the model accepts"
            )
        object.__setattr__(self, "modalities", tuple(m.upper() for m in mods))
        if self.series_rule not in SERIES_RULES:
            raise ModelCardError(
                f"input.series_rule {self.series_rule!r} is unknown; use one of {', '.join(SERIES_RULES)}"
            )


@dataclass(frozen=True)
class ImageSpec:
    """How pixels become the network input: dimensionality, output size, channels, intensity window.

    `window` is (low, high) in modality units (after rescale slope/intercept, e.g. Hounsfield units);
    None means percentile normalisation (0.5th..99.5th) suited to projection radiographs whose raw
    values vary by vendor. For 3D, `size` is (slices, rows, columns).

    `lesion_channel` makes the classifier segmentation-guided: the card's `segmenter` computes a lesion
    probability map from the prepared image and the network reads it as one more channel
    (`network_channels`, see guide.py). A CNN trained on a few hundred labels learns "how large is the
    bright blob" poorly; the segmenter learned where lesions are from masks, a different supervision.
    """

    spatial_dims: int
    size: tuple[int, ...]
    channels: int
    window: tuple[float, float] | None
    encoder: str
    lesion_channel: bool = False

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ModelCardError(f"image.spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if isinstance(self.size, (str, bytes)) or not isinstance(self.size, Sequence):
            raise ModelCardError(
                f"image.size must be a list of {self.spatial_dims} integers, got {self.size!r}"
            )
        size = tuple(_positive_int(s, "image.size entries") for s in self.size)
        if len(size) != self.spatial_dims:
            raise ModelCardError(
                f"image.size {list(size)} has {len(size)} entries but spatial_dims is {self.spatial_dims}"
            )
        object.__setattr__(self, "size", size)
        _positive_int(self.channels, "image.channels")
        if self.window is not None:
            if isinstance(self.window, (str, bytes)) or len(self.window) != 2:
                raise ModelCardError(f"image.window must be [low, high] or omitted, got {self.window!r}")
            lo, hi = (_finite(v, "image.window") for v in self.window)
            if not lo < hi:
                raise ModelCardError(f"image.window low must be below high, got [{lo}, {hi}]")
            object.__setattr__(self, "window", (lo, hi))
        if self.encoder not in ENCODERS:
            raise ModelCardError(
                f"image.encoder {self.encoder!r} is unknown; use one of {', '.join(ENCODERS)}"
            )
        if not isinstance(self.lesion_channel, bool):
            raise ModelCardError(f"image.lesion_channel must be true or false, got {self.lesion_channel!r}")

    @property
    def network_channels(self) -> int:
        """Input channels of the network: the prepared image's plus the lesion probability map, if any."""
        return self.channels + int(self.lesion_channel)


@dataclass(frozen=True)
class TimelineFeature:
    """One column of the timeline tensor.

    `kind` "observation": the mean of the values of Observations coded `system`|`code` in a bin,
    scaled by (v - mean) / std. Other kinds: the number of events of that kind (and code, unless the
    code is "*") in a bin, scaled the same way. `unit` documents the expected unit; observations that
    carry a different unit are skipped rather than mixed (no unit conversion is attempted).
    """

    name: str
    kind: str
    system: str
    code: str
    unit: str | None
    mean: float
    std: float

    def __post_init__(self) -> None:
        _non_empty(self.name, "timeline feature name")
        if self.kind not in EVENT_KINDS:
            raise ModelCardError(
                f"timeline feature {self.name!r}: kind {self.kind!r} is unknown; "
                f"use one of {', '.join(EVENT_KINDS)}"
            )
        _non_empty(self.system, f"timeline feature {self.name!r} system")
        _non_empty(self.code, f"timeline feature {self.name!r} code")
        if self.kind == "observation" and self.code == ANY:
            raise ModelCardError(
                f"timeline feature {self.name!r}: an observation feature needs a concrete code, "
                "averaging values of different codes is meaningless"
            )
        if self.unit is not None:
            _non_empty(self.unit, f"timeline feature {self.name!r} unit")
        object.__setattr__(self, "mean", _finite(self.mean, f"timeline feature {self.name!r} mean"))
        std = _finite(self.std, f"timeline feature {self.name!r} std")
        if std <= 0:
            raise ModelCardError(f"timeline feature {self.name!r}: std must be > 0, got {std}")
        object.__setattr__(self, "std", std)

    @property
    def is_count(self) -> bool:
        """True for features that count events rather than average observation values."""
        return self.kind != "observation"


@dataclass(frozen=True)
class TimelineSpec:
    """Which EHR events make up the timeline and how they are binned (see timeline.encode_timeline)."""

    resource_types: tuple[str, ...]
    window_days: int
    bin_days: int
    features: tuple[TimelineFeature, ...]

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "resource_types", _tuple_of_str(self.resource_types, "timeline.resource_types")
        )
        _positive_int(self.window_days, "timeline.window_days")
        _positive_int(self.bin_days, "timeline.bin_days")
        if self.bin_days > self.window_days:
            raise ModelCardError(
                f"timeline.bin_days ({self.bin_days}) is larger than "
                f"timeline.window_days ({self.window_days})"
            )
        features = tuple(self.features)
        if not features:
            raise ModelCardError("timeline.features is empty: the LSTM branch needs at least one feature")
        if not all(isinstance(f, TimelineFeature) for f in features):
            raise ModelCardError("timeline.features must hold TimelineFeature objects")
        names = [f.name for f in features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ModelCardError(f"timeline feature names must be unique; repeated: {', '.join(dupes)}")
        object.__setattr__(self, "features", features)

    @property
    def n_bins(self) -> int:
        """Bins in the window; the oldest may be partial when window_days is not a multiple of bin_days."""
        return math.ceil(self.window_days / self.bin_days)


@dataclass(frozen=True)
class ModelCard:
    """A checkpoint's description. `weights` is absolute here and relative to the card in the file."""

    name: str
    version: str
    weights: Path
    sha256: str
    input: InputSelection
    image: ImageSpec
    timeline: TimelineSpec
    classes: tuple[ClassSpec, ...]
    positive_class: str
    threshold: float
    metrics: dict[str, float]
    path: Path
    segmenter: Path | None = None
    """Segmentation card (`segcard.py`) that runs with this model; absolute here, relative to the card in
    the file; None = no lesion segmentation."""

    def __post_init__(self) -> None:
        _non_empty(self.name, "name")
        _non_empty(self.version, "version")
        object.__setattr__(self, "weights", Path(self.weights))
        if self.segmenter is not None:
            object.__setattr__(self, "segmenter", Path(self.segmenter))
        elif self.image.lesion_channel:
            raise ModelCardError(
                "image.lesion_channel is true but the card names no `segmenter`; add the segmentation card "
                "the model was trained with (e.g. segmenter = \"../default_segmenter/card.toml\")"
            )
        object.__setattr__(self, "path", Path(self.path))
        sha = self.sha256.lower() if isinstance(self.sha256, str) else self.sha256
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ModelCardError(
                f"sha256 must be 64 hex digits (the digest of the weights file), got {self.sha256!r}"
            )
        object.__setattr__(self, "sha256", sha)
        for attr, kind in (("input", InputSelection), ("image", ImageSpec), ("timeline", TimelineSpec)):
            if not isinstance(getattr(self, attr), kind):
                raise TypeError(f"ModelCard.{attr} must be a {kind.__name__}")
        classes = tuple(self.classes)
        if len(classes) < 2 or not all(isinstance(c, ClassSpec) for c in classes):
            raise ModelCardError("classes must list at least two ClassSpec entries")
        names = [c.name for c in classes]
        if len(set(names)) != len(names):
            raise ModelCardError(f"class names must be unique, got {names}")
        object.__setattr__(self, "classes", classes)
        if self.positive_class not in names:
            raise ModelCardError(f"positive_class {self.positive_class!r} is not one of the classes {names}")
        threshold = _finite(self.threshold, "threshold")
        if not 0.0 <= threshold <= 1.0:
            raise ModelCardError(f"threshold must be a probability in [0, 1], got {threshold}")
        object.__setattr__(self, "threshold", threshold)
        if not isinstance(self.metrics, Mapping):
            raise ModelCardError(f"metrics must be a table of name = number, got {self.metrics!r}")
        object.__setattr__(
            self, "metrics", {str(k): _finite(v, f"metrics.{k}") for k, v in self.metrics.items()}
        )

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)


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


# --------------------------------------------------------------------------- TOML reading

_NESTED = {"input", "image", "timeline", "classes", "features"}
"""Fields holding value objects: built by the caller, not copied from the table."""


def _fields_of(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _build(cls: type[_T], table: Any, where: str, **given: Any) -> _T:
    """Construct value object `cls` from a TOML table: unknown keys are errors (a typo like `treshold`
    must not silently fall back to a default), `X | None` fields may be omitted, and the constructor
    validates the values."""
    fields = _fields_of(cls)
    known = set(fields) - {"path"}
    if not isinstance(table, Mapping):
        raise ModelCardError(f"{where or 'the card'} must be a table")
    unknown = sorted(set(table) - known)
    if unknown:
        raise ModelCardError(
            f"unknown key(s) in {where or 'the top level'}: {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(known))})"
        )
    kwargs = dict(given)
    for name in sorted(known - set(given)):
        field = fields[name]
        if name in table:
            kwargs[name] = table[name]
        elif field.default is not dataclasses.MISSING:
            continue
        elif "None" in str(field.type):
            kwargs[name] = None
        else:
            raise ModelCardError(f"missing key {where + '.' if where else ''}{name}")
    return cls(**kwargs)


def _table(data: Mapping[str, Any], key: str, where: str = "") -> Any:
    if key not in data:
        raise ModelCardError(
            f"missing {'table' if key not in ('classes', 'features') else 'list'} "
            f"{where + '.' if where else ''}{key}"
        )
    return data[key]


def _card_from_toml(data: Mapping[str, Any], path: Path) -> ModelCard:
    fmt = data.get("card_format", CARD_FORMAT)
    if fmt != CARD_FORMAT:
        raise ModelCardError(f"card_format {fmt!r} is not supported by this version (expects {CARD_FORMAT})")
    timeline = _table(data, "timeline")
    features = tuple(
        _build(TimelineFeature, f, f"timeline.features[{i}]")
        for i, f in enumerate(_table(timeline, "features", "timeline"))
    )
    classes = tuple(_build(ClassSpec, c, f"classes[{i}]") for i, c in enumerate(_table(data, "classes")))
    weights = Path(str(_table(data, "weights")))
    segmenter = Path(str(data["segmenter"])) if "segmenter" in data else None
    return _build(
        ModelCard,
        {k: v for k, v in data.items() if k != "card_format"},
        "",
        weights=weights if weights.is_absolute() else (path.parent / weights).resolve(),
        input=_build(InputSelection, _table(data, "input"), "input"),
        image=_build(ImageSpec, _table(data, "image"), "image"),
        timeline=_build(TimelineSpec, timeline, "timeline", features=features),
        classes=classes,
        metrics=dict(data.get("metrics", {})),
        path=path,
        segmenter=None if segmenter is None else (
            segmenter if segmenter.is_absolute() else (path.parent / segmenter).resolve()),
    )


def load_card(path: Path) -> ModelCard:
    """Read and validate a TOML model card; the weights path in the file is relative to the card.

    Does not read the weights (use `verify_weights`), so a card can be inspected on a host that has no
    checkpoint, e.g. by the API listing models.
    """
    path = Path(path).resolve()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ModelCardError(
            f"model card {path} does not exist; point the model setting at an existing card.toml, or "
            f"{REGENERATE_HINT}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelCardError(
            f"model card {path} is not valid TOML: {exc}; fix the file or {REGENERATE_HINT}"
        ) from exc
    try:
        return _card_from_toml(data, path)
    except (ModelCardError, TypeError) as exc:
        raise ModelCardError(f"model card {path}: {exc}") from exc


# --------------------------------------------------------------------------- TOML writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ModelCardError(f"cannot write non-finite number {value!r} to a card")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ModelCardError(f"cannot write {type(value).__name__} value {value!r} to a card")


def _toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else json.dumps(key, ensure_ascii=False)


def _lines(table: Mapping[str, Any]) -> list[str]:
    return [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if v is not None]


def _values(obj: Any, *, skip: frozenset[str] = frozenset(_NESTED)) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name not in skip}


def _relative(target: Path, path: Path) -> str:
    try:
        return Path(os.path.relpath(target.resolve(), path.parent)).as_posix()
    except ValueError:  # other drive on Windows
        return target.resolve().as_posix()


def card_to_toml(card: ModelCard, path: Path | None = None) -> str:
    """The TOML text of a card; weights and segmenter paths are written relative to `path` (default card.path)."""
    path = Path(path or card.path).resolve()
    weights = _relative(card.weights, path)
    top = {"card_format": CARD_FORMAT,
           **_values(card, skip=frozenset({*_NESTED, "metrics", "path", "segmenter"}))}
    if card.segmenter is not None:
        top["segmenter"] = _relative(card.segmenter, path)
    out = [
        "# dicom-fusion model card (see inference/card/model.py). Weights path is relative to this file.",
        *_lines({**top, "weights": weights}),
    ]
    for name in ("input", "image", "timeline"):
        out += ["", f"[{name}]", *_lines(_values(getattr(card, name)))]
    for feature in card.timeline.features:
        out += ["", "[[timeline.features]]", *_lines(_values(feature))]
    for cls in card.classes:
        out += ["", "[[classes]]", *_lines(_values(cls))]
    out += ["", "[metrics]", *_lines(card.metrics)]
    return "\n".join(out) + "\n"


def write_card(card: ModelCard, path: Path) -> None:
    """Write `card` as TOML to `path` atomically (temp file + rename), so a worker never reads half a card."""
    path = Path(path)
    text = card_to_toml(card, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- defaults


DEFAULT_NAME = "dfusion-hybrid-demo"
DEFAULT_VERSION = "0.1.0"
DEFAULT_CLASSES = (
    ClassSpec(name="benign", code="3898006", display="Neoplasm, benign"),
    ClassSpec(name="malignant", code="363346000", display="Malignant neoplastic disease"),
)
DEFAULT_POSITIVE_CLASS = "malignant"
DEFAULT_INPUT = InputSelection(modalities=("DX", "CR", "XC", "OT", "CT", "MR"))
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
    )


def default_card_path() -> Path:
    """Path of the card shipped as package data (`dicom_fusion.inference/default_model/card.toml`)."""
    return Path(str(resources.files("dicom_fusion.inference").joinpath("default_model", "card.toml")))


__all__ = [
    "ANY",
    "CARD_FORMAT",
    "DEFAULT_CLASSES",
    "DEFAULT_IMAGE",
    "DEFAULT_INPUT",
    "DEFAULT_TIMELINE",
    "ENCODERS",
    "EVENT_KINDS",
    "LOINC",
    "SERIES_RULES",
    "SNOMED",
    "ClassSpec",
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
