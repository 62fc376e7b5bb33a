"""Serving: load a verified checkpoint once, turn one prepared study (+ timeline) into an InferenceResult.

`InferenceResult` is what crosses into the service (SR builder, FHIR report, ledger): plain values with
codes copied from the card, JSON round-trippable so it can be stored and replayed without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dicom_fusion.inference.card.model import (
    INDETERMINATE,
    REGENERATE_HINT,
    ModelCard,
    load_card,
    verify_weights,
)
from dicom_fusion.inference.data.images import PreparedImage
from dicom_fusion.inference.data.timeline_tensor import TimelineTensor, rescale_timeline
from dicom_fusion.inference.errors import InferenceError, WeightsMismatchError
from dicom_fusion.inference.nets.hybrid import HybridNet, build_model, collate_timelines
from dicom_fusion.inference.serve.lesion_channel import load_guide, with_lesion_channel

if TYPE_CHECKING:
    from dicom_fusion.inference.serve.explain import Explanation

NO_TIMELINE = "no_timeline"


@dataclass(frozen=True)
class ClassProbability:
    """One class of the card with its predicted probability."""

    name: str
    code: str
    system: str
    display: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassProbability:
        return cls(
            name=str(data["name"]),
            code=str(data["code"]),
            system=str(data["system"]),
            display=str(data["display"]),
            probability=float(data["probability"]),
        )


@dataclass(frozen=True)
class Driver:
    """A timeline feature that moved the prediction: integrated-gradients attribution toward the
    card's positive class (positive = toward it), from `Predictor.explain`."""

    name: str
    attribution: float

    def describe(self, positive_class: str) -> str:
        """One line for the SR, the DiagnosticReport and the ORU, e.g. "glucose +0.121 toward malignant"."""
        direction = "toward" if self.attribution >= 0 else "against"
        return f"{self.name} {self.attribution:+.3f} {direction} {positive_class}"


@dataclass(frozen=True)
class InferenceResult:
    """Model output for one study; `image_only_reason` says why the timeline was not used, if it was not.
    `drivers` are the top timeline features of the explanation (empty when not explained or image-only)."""

    model_name: str
    model_version: str
    probabilities: tuple[ClassProbability, ...]
    finding: ClassProbability
    image_only: bool
    image_only_reason: str | None
    drivers: tuple[Driver, ...] = ()
    positive_class: str = ""
    calibration: str = ""
    """How the probabilities were calibrated (`Calibrator.describe()`), "" = not calibrated (older cards)."""
    uncertainty: str = ""
    """An ensemble's agreement in words (`uncertainty_line`), "" for a single network."""
    spread: float | None = None
    """An ensemble's spread: standard deviation of its members' calibrated positive-class probabilities."""
    indeterminate_reason: str = ""
    """Why the finding is indeterminate, as the SR and the reports say it (`choose_finding`); "" otherwise."""

    @property
    def indeterminate(self) -> bool:
        """True when the calibrated probability fell in the card's indeterminate band (no class decided)."""
        return self.finding.name == INDETERMINATE.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "probabilities": [p.to_dict() for p in self.probabilities],
            "finding": self.finding.to_dict(),
            "image_only": self.image_only,
            "image_only_reason": self.image_only_reason,
            "drivers": [asdict(d) for d in self.drivers],
            "positive_class": self.positive_class,
            "calibration": self.calibration,
            "uncertainty": self.uncertainty,
            "spread": self.spread,
            "indeterminate_reason": self.indeterminate_reason,
        }

    def driver_lines(self) -> tuple[str, ...]:
        """The drivers as text lines, largest first (what the reports print)."""
        return tuple(d.describe(self.positive_class or "the positive class") for d in self.drivers)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InferenceResult:
        reason = data.get("image_only_reason")
        return cls(
            model_name=str(data["model_name"]),
            model_version=str(data["model_version"]),
            probabilities=tuple(ClassProbability.from_dict(p) for p in data["probabilities"]),
            finding=ClassProbability.from_dict(data["finding"]),
            image_only=bool(data["image_only"]),
            image_only_reason=None if reason is None else str(reason),
            drivers=tuple(
                Driver(name=str(d["name"]), attribution=float(d["attribution"])) for d in data.get("drivers", ())
            ),
            positive_class=str(data.get("positive_class", "")),
            calibration=str(data.get("calibration", "")),
            uncertainty=str(data.get("uncertainty", "")),
            spread=None if data.get("spread") is None else float(data["spread"]),
            indeterminate_reason=str(data.get("indeterminate_reason", "")),
        )


def resolve_device(device: str) -> torch.device:
    """ "auto" -> the first CUDA device when there is one, else the CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(
            f"device {device!r} was requested but CUDA is not available here; "
            "use device 'auto' or 'cpu', or install the CUDA build of torch"
        )
    return resolved


def calibrated_probabilities(
    card: ModelCard, raw: Sequence[float], *, image_only: bool
) -> tuple[ClassProbability, ...]:
    """The card's classes with calibrated probabilities: the positive class's through the card's
    calibrator (its no-EHR one for an image-only prediction), the other classes scaled to share the rest
    in their raw proportions. Without a `[calibration]` table the raw probabilities, unchanged."""
    values = [float(v) for v in raw]
    if card.calibration is not None:
        k = card.positive_index
        positive = float(card.calibrated(values[k], image_only=image_only))
        rest = 1.0 - values[k]
        others = len(values) - 1
        values = [positive if i == k else ((v / rest) * (1.0 - positive) if rest > 0 else (1.0 - positive) / others)
                  for i, v in enumerate(values)]
    return tuple(
        ClassProbability(name=c.name, code=c.code, system=c.system, display=c.display, probability=p)
        for c, p in zip(card.classes, values, strict=True)
    )


def choose_finding(
    card: ModelCard, probabilities: tuple[ClassProbability, ...], spread: float | None = None
) -> tuple[ClassProbability, str]:
    """The finding and, when it is "indeterminate" (SNOMED CT 82334004), why, in words for the reports.

    Indeterminate when the positive class's probability lies in the card's indeterminate band, or when an
    ensemble's members disagree: their `spread` exceeds the card's `ensemble.max_spread`. Otherwise the
    positive class if it reaches the card's threshold, else the likeliest other class. The indeterminate
    finding carries the positive class's probability.
    """
    positive = probabilities[card.positive_index]
    max_spread = card.ensemble.max_spread if card.ensemble is not None else None
    reason = ""
    if card.is_indeterminate(positive.probability):
        reason = (f"the calibrated probability of {positive.name} ({positive.probability:.2f}) lies in the model's "
                  "indeterminate band around its decision threshold")
    elif spread is not None and max_spread is not None and spread > max_spread:
        reason = (f"the ensemble's members disagree: the spread of their calibrated probabilities of "
                  f"{positive.name} is {spread:.2f}, above the model's limit of {max_spread:.2f}")
    if reason:
        return ClassProbability(name=INDETERMINATE.name, code=INDETERMINATE.code, system=INDETERMINATE.system,
                                display=INDETERMINATE.display, probability=positive.probability), reason
    if positive.probability >= card.threshold:
        return positive, ""
    others = [p for i, p in enumerate(probabilities) if i != card.positive_index]
    return max(others, key=lambda p: p.probability), ""  # max keeps the first of equals: deterministic


def member_spread(card: ModelCard, raw_positive: Sequence[float], *, image_only: bool) -> float | None:
    """An ensemble's spread: the standard deviation of its members' calibrated positive-class probabilities
    (`raw_positive`, one per member); None for a single network."""
    if len(raw_positive) < 2:
        return None
    return float(np.std(card.calibrated(list(raw_positive), image_only=image_only)))


def uncertainty_line(card: ModelCard, members: int, spread: float) -> str:
    """The ensemble's agreement as the SR and the reports print it."""
    positive = card.classes[card.positive_index].name
    return (f"ensemble of {members} networks; spread {spread:.3f} (standard deviation of their calibrated "
            f"probabilities of {positive})")


def calibration_label(card: ModelCard, image_only: bool) -> str:
    """The calibration the result's probabilities went through, as the SR and reports name it."""
    if card.calibration is None:
        return ""
    return card.calibration.for_path(image_only).describe()


@dataclass(frozen=True)
class Member:
    """One network of a predictor: its card (the timeline scaling it was trained with) and its weights."""

    card: ModelCard
    model: HybridNet


def load_network(card: ModelCard, target: torch.device) -> HybridNet:
    """The card's weights checked (sha256) and loaded strictly into the network the card describes."""
    verify_weights(card)
    try:
        state = torch.load(card.weights, map_location=target, weights_only=True)
    except Exception as exc:  # unpickling / zip errors: the file is not a state_dict we can use
        raise WeightsMismatchError(
            f"weights file {card.weights} could not be loaded as a state_dict ({exc}); {REGENERATE_HINT}"
        ) from exc
    model = build_model(card)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise WeightsMismatchError(
            f"weights file {card.weights} does not fit the network described by card {card.path} "
            f"(encoder {card.image.encoder}, {card.image.network_channels} input channel(s), "
            f"{len(card.timeline.features)} timeline features, {len(card.classes)} classes): "
            f"{str(exc).splitlines()[0]}; write the card from the same training run as the weights, or "
            f"{REGENERATE_HINT}"
        ) from exc
    return model


def check_member(card: ModelCard, member: ModelCard) -> None:
    """Refuse an ensemble member that does not read and say the same as the ensemble's card."""
    differences = [
        what for what, a, b in (
            ("classes", card.classes, member.classes),
            ("positive_class", card.positive_class, member.positive_class),
            ("image", card.image, member.image),
            ("input", card.input, member.input),
            ("timeline features", [(f.name, f.kind, f.unit) for f in card.timeline.features],
             [(f.name, f.kind, f.unit) for f in member.timeline.features]),
            ("timeline bins", (card.timeline.window_days, card.timeline.bin_days),
             (member.timeline.window_days, member.timeline.bin_days)),
        ) if a != b
    ]
    if differences:
        raise InferenceError(
            f"ensemble member {member.path} differs from card {card.path} in {', '.join(differences)}; members "
            "must be networks of one model (write them with one training run: train.toml `ensemble = true`)"
        )


class Predictor:
    """A loaded model ready to predict single studies; build it with `Predictor.load`.

    An ensemble card (`[ensemble]`) loads every member; `predict` averages their raw probabilities before
    the card's calibration and reports their spread, `explain` averages their explanations.
    """

    def __init__(self, card: ModelCard, model: HybridNet, device: torch.device,
                 members: Sequence[Member] = ()) -> None:
        self.card = card
        self.device = device
        self.model = model.to(device).eval()
        self.members = (Member(card, self.model),
                        *(Member(m.card, m.model.to(device).eval()) for m in members))
        self.guide = load_guide(card, device)  # the lesion-channel segmenter, if the card has one

    @classmethod
    def load(cls, card_path: Path, device: str = "auto") -> Predictor:
        """Read the card (and its ensemble members'), check each weights' sha256, load them strictly and
        switch to eval mode."""
        card = load_card(card_path)
        target = resolve_device(device)
        model = load_network(card, target)
        members = []
        for path in card.member_paths:
            member = load_card(path)
            check_member(card, member)
            members.append(Member(member, load_network(member, target)))
        return cls(card, model, target, members)

    def network_input(self, images: Sequence[PreparedImage | np.ndarray]) -> np.ndarray:
        """Prepared images -> the network's input batch [N, network_channels, *size] (lesion channel added
        when the card asks for it); a wrongly prepared image fails here with its index."""
        expected = (self.card.image.channels, *self.card.image.size)
        arrays = []
        for i, image in enumerate(images):
            array = image.array if isinstance(image, PreparedImage) else np.asarray(image)
            if array.shape != expected:
                where = f"image {i} of the batch" if len(images) > 1 else "image"
                raise ValueError(
                    f"{where} has shape {array.shape} but the model expects {expected} (channels, *size); "
                    "prepare it with transforms.load_study_image or transforms.prepare_array"
                )
            arrays.append(np.asarray(array, dtype=np.float32))
        return with_lesion_channel(np.stack(arrays), self.guide)

    def _image_tensor(self, image: PreparedImage | np.ndarray) -> torch.Tensor:
        return torch.as_tensor(self.network_input([image]), device=self.device)

    def member_timeline(self, member: Member, timeline: TimelineTensor | None) -> TimelineTensor | None:
        """`timeline` (encoded with this predictor's card) as `member` was trained to read it."""
        if timeline is None or member.card is self.card:
            return timeline
        return rescale_timeline(timeline, self.card.timeline, member.card.timeline)

    def raw_probabilities(self, x: torch.Tensor, timeline: TimelineTensor | None) -> list[list[float]]:
        """Uncalibrated class probabilities of every member for one network input [1, C, *size]."""
        out = []
        with torch.inference_mode():
            for member in self.members:
                tl = collate_timelines([self.member_timeline(member, timeline)], member.card.timeline).to(self.device)
                logits = member.model(x, tl.values, tl.mask, tl.deltas, tl.lengths, tl.has_timeline)
                out.append(torch.softmax(logits.float(), dim=1)[0].cpu().tolist())
        return out

    def predict(
        self,
        image: PreparedImage | np.ndarray,
        timeline: TimelineTensor | None,
        image_only_reason: str | None = None,
    ) -> InferenceResult:
        """Class probabilities and finding for one study.

        With `timeline` None the prediction is image-only and flagged with `image_only_reason` (default
        "no_timeline"; the service passes e.g. the FHIR timeline status). The reason is ignored when a
        timeline is given. Same inputs give the same result (eval mode, no sampling).
        """
        per_member = self.raw_probabilities(self._image_tensor(image), timeline)
        probs = np.mean(np.asarray(per_member, dtype=np.float64), axis=0).tolist()
        if not all(math.isfinite(p) for p in probs):
            # e.g. an absurd but finite input value that overflowed in the network: never a finding
            # without a probability; retrying the same inputs gives the same numbers
            raise InferenceError(
                f"model {self.card.name} {self.card.version} produced non-finite probabilities "
                f"({', '.join(f'{c.name}={p}' for c, p in zip(self.card.classes, probs, strict=True))}) "
                f"from this study's {'image and timeline' if timeline is not None else 'image'}; check the "
                "input values (plausible min/max on the model card's timeline features drop absurd ones)"
            )
        image_only = timeline is None
        probabilities = calibrated_probabilities(self.card, probs, image_only=image_only)
        raw = [p[self.card.positive_index] for p in per_member]
        spread = member_spread(self.card, raw, image_only=image_only)
        finding, reason = choose_finding(self.card, probabilities, spread)
        return InferenceResult(
            model_name=self.card.name,
            model_version=self.card.version,
            probabilities=probabilities,
            finding=finding,
            image_only=image_only,
            image_only_reason=(image_only_reason or NO_TIMELINE) if image_only else None,
            positive_class=self.card.classes[self.card.positive_index].name,
            calibration=calibration_label(self.card, image_only),
            uncertainty="" if spread is None else uncertainty_line(self.card, len(per_member), spread),
            spread=spread,
            indeterminate_reason=reason,
        )

    def explain(self, image: PreparedImage | np.ndarray, timeline: TimelineTensor | None) -> Explanation:
        """Grad-CAM saliency map [*size] of the image branch and, with a timeline, integrated-gradients
        attributions per timeline feature (`Explanation.top_features()` for the report text); for an
        ensemble the mean of its members' (what the averaged prediction looked at).

        A separate call rather than a flag on `predict`, so `InferenceResult` stays a plain JSON value;
        costs about one extra forward/backward pass per member (see explain.py).
        """
        from dicom_fusion.inference.serve.explain import average_explanations, explain

        array = self._image_tensor(image)[0].cpu().numpy()
        explanations = [explain(m.model, m.card, array, self.member_timeline(m, timeline)) for m in self.members]
        return explanations[0] if len(explanations) == 1 else average_explanations(explanations)


__all__ = [
    "NO_TIMELINE",
    "ClassProbability",
    "Driver",
    "InferenceResult",
    "Member",
    "Predictor",
    "calibrated_probabilities",
    "calibration_label",
    "check_member",
    "choose_finding",
    "load_network",
    "member_spread",
    "resolve_device",
    "uncertainty_line",
]
