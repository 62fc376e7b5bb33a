"""Why the model said what it said: Grad-CAM on the image branch, integrated gradients on the timeline.

* Image: MONAI's `GradCAM` for the card's positive class, with the patient's timeline held fixed, each
  map upsampled to the input size and scaled to [0, 1]. For the small CNN it is a layer combination
  (`TARGET_LAYERS`): the map of the second block (32 x 32 at 128²: sharp, but it also lights up edges
  elsewhere) times the map of the last block (8 x 8: where the class evidence is, but coarse). A map that
  is empty (no positive evidence at that layer, common for a confident negative) is left out of the
  product rather than zeroing it. On 80 patients no model saw (synthetic seed 99, the shipped model)
  the share of the map inside the planted lesion disc rose from 0.38 ± 0.17 (last block alone; peak in
  the disc for 42 %) to 0.73 ± 0.34 (peak inside for 96 %); the second block alone gave 0.60 ± 0.38
  (95 %), the last block gated by a dilated copy of itself or Grad-CAM++ did not do better.
* Timeline: integrated gradients of the positive-class probability with respect to the scaled
  timeline values, from the baseline "every value at its training mean" (0 after scaling) to the
  patient, 32 steps in one batch. The visit pattern (mask, time deltas) is kept, so an attribution
  says how much the *values* of a feature moved the probability; summed over time steps per feature.
  By completeness the attributions add up to p(patient) - p(baseline), up to the step error.

Both cost one or two forward/backward passes of a small network: cheap enough to run per study on a
CPU worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.visualize import GradCAM
from torch import nn

from dicom_fusion.inference.card.model import ModelCard
from dicom_fusion.inference.data.timeline_tensor import TimelineTensor
from dicom_fusion.inference.nets.hybrid import HybridNet, TimelineBatch, collate_timelines

IG_STEPS = 32
TARGET_LAYERS: dict[str, tuple[str, ...]] = {
    "smallcnn": ("net.image_encoder.features.1", "net.image_encoder.features.3"),  # 32x32 gated by 8x8
    "densenet121": ("net.image_encoder.features.denseblock4",),
    "efficientnet-b0": ("net.image_encoder._blocks.15",),
}
"""Grad-CAM layers per encoder (module names as seen from the wrapper that fixes the timeline); several
are multiplied (see the module docstring). The pretrained encoders keep their last block alone: no
combination was measured for them."""


@dataclass(frozen=True)
class FeatureAttribution:
    """Integrated-gradients attribution of one timeline feature (positive = pushed toward positive class)."""

    name: str
    attribution: float


@dataclass(frozen=True, eq=False)
class Explanation:
    """Saliency map of the image branch and per-feature timeline attributions for one study."""

    probability: float  # positive-class probability of the explained input
    saliency: np.ndarray  # float32 [*image size], in [0, 1]
    attributions: tuple[FeatureAttribution, ...]  # card feature order; () without a timeline

    def top_features(self, n: int = 3) -> tuple[FeatureAttribution, ...]:
        """The n features with the largest absolute attribution, largest first."""
        return tuple(sorted(self.attributions, key=lambda a: -abs(a.attribution))[:n])


class _FixedTimeline(nn.Module):
    """HybridNet as a function of the image only (what GradCAM expects), the timeline held fixed."""

    def __init__(self, net: HybridNet, timeline: TimelineBatch) -> None:
        super().__init__()
        self.net = net
        self.timeline = timeline

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Per-class log-odds (logit_c - logsumexp of the other logits), not raw logits.

        With a softmax head the raw logit of one class also rises with evidence shared by all classes;
        its gradient pointed Grad-CAM away from the lesion on the synthetic cohort. The log-odds is what
        moves the predicted probability.
        """
        tl = self.timeline
        logits = self.net(
            image.expand(tl.values.shape[0], *image.shape[1:]),
            tl.values,
            tl.mask,
            tl.deltas,
            tl.lengths,
            tl.has_timeline,
        )
        n = logits.shape[1]
        others = torch.stack(
            [torch.logsumexp(logits[:, [j for j in range(n) if j != c]], dim=1) for c in range(n)], dim=1
        )
        return logits - others


def _unit_range(x: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1], high = important. MONAI's default postprocessing maps (min, max) to
    (1, 0) - it flips the map - which made Grad-CAM look as if it avoided the lesion."""
    flat = x.reshape(x.shape[0], -1)
    low = flat.min(dim=1).values.reshape(-1, *[1] * (x.dim() - 1))
    span = (flat.max(dim=1).values.reshape(-1, *[1] * (x.dim() - 1)) - low).clamp_min(1e-12)
    return (x - low) / span


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def grad_cam(
    model: HybridNet,
    card: ModelCard,
    image: np.ndarray,
    timeline: TimelineTensor | None,
    *,
    layer: str | None = None,
) -> np.ndarray:
    """Grad-CAM map [*size] in [0, 1] for the positive class: the product of the maps of the encoder's
    TARGET_LAYERS that are not empty (all zero if every one is); `layer` = that one layer alone."""
    device = _device(model)
    tl = collate_timelines([timeline], card.timeline).to(device)
    wrapper = _FixedTimeline(model, tl).eval()
    x = torch.as_tensor(np.asarray(image, np.float32), device=device).unsqueeze(0)
    combined: np.ndarray | None = None
    for target in (layer,) if layer else TARGET_LAYERS[card.image.encoder]:
        cam = GradCAM(nn_module=wrapper, target_layers=target, postprocessing=_unit_range)
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
            saliency = cam(x, class_idx=card.positive_index)
        out = np.nan_to_num(np.asarray(torch.as_tensor(saliency).detach().cpu().numpy()[0, 0], dtype=np.float32))
        if not out.max() > 0:
            continue  # no positive evidence at this layer: it would zero the product
        combined = out if combined is None else combined * out
    if combined is None:
        return np.zeros(tuple(card.image.size), dtype=np.float32)
    return np.asarray(_unit_range(torch.from_numpy(combined)[None]).numpy()[0], dtype=np.float32)


def integrated_gradients(
    model: HybridNet, card: ModelCard, image: np.ndarray, timeline: TimelineTensor, *, steps: int = IG_STEPS
) -> np.ndarray:
    """IG attributions [T, F] of the timeline values toward the positive-class probability."""
    device = _device(model)
    tl = collate_timelines([timeline], card.timeline).to(device)
    x = torch.as_tensor(np.asarray(image, np.float32), device=device).unsqueeze(0)
    alphas = ((torch.arange(steps, dtype=torch.float32, device=device) + 0.5) / steps).reshape(-1, 1, 1)
    path = (alphas * tl.values).detach().requires_grad_(True)  # baseline 0 = training mean of each feature
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            image_features = model.image_cnn_features(x).expand(steps, -1)  # one CNN pass for every step
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
            logits = model.fuse(
                image_features,
                path,
                tl.mask.expand(steps, -1, -1),
                tl.deltas.expand(steps, -1),
                tl.lengths.expand(steps),
                tl.has_timeline.expand(steps),
            )
            prob = torch.softmax(logits, dim=1)[:, card.positive_index].sum()
            (grads,) = torch.autograd.grad(prob, path)
    finally:
        model.train(was_training)
    attributions = grads.mean(dim=0) * tl.values[0]
    return np.asarray(attributions.detach().cpu().numpy(), dtype=np.float64)


def explain(
    model: HybridNet,
    card: ModelCard,
    image: np.ndarray,
    timeline: TimelineTensor | None,
    *,
    layer: str | None = None,
    steps: int = IG_STEPS,
) -> Explanation:
    """Grad-CAM saliency and (when there is a timeline) per-feature IG attributions for one study.

    `image` is the network input (`Predictor.network_input`): with a lesion channel, that channel too.
    """
    expected = (card.image.network_channels, *card.image.size)
    if tuple(np.shape(image)) != expected:
        raise ValueError(
            f"image has shape {np.shape(image)} but the model expects {expected} (channels, *size); "
            "with a lesion channel, build it with Predictor.network_input or guide.with_lesion_channel"
        )
    device = _device(model)
    tl = collate_timelines([timeline], card.timeline).to(device)
    model.eval()
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(image, np.float32), device=device).unsqueeze(0)
        logits = model(x, tl.values, tl.mask, tl.deltas, tl.lengths, tl.has_timeline)
        probability = float(torch.softmax(logits.float(), dim=1)[0, card.positive_index])
    saliency = grad_cam(model, card, image, timeline, layer=layer)
    attributions: tuple[FeatureAttribution, ...] = ()
    if timeline is not None:
        per_feature = integrated_gradients(model, card, image, timeline, steps=steps).sum(axis=0)
        attributions = tuple(
            FeatureAttribution(f.name, float(a))
            for f, a in zip(card.timeline.features, per_feature, strict=True)
        )
    return Explanation(probability=probability, saliency=saliency, attributions=attributions)


def average_explanations(explanations: Sequence[Explanation]) -> Explanation:
    """An ensemble's explanation: the members' mean probability, their mean saliency scaled back to [0, 1]
    (peak 1, as one network's map) and their mean attribution per feature. Raises ValueError for no
    explanation or maps of different shapes."""
    if not explanations:
        raise ValueError("no explanation to average; an ensemble has at least one member")
    maps = np.stack([e.saliency for e in explanations])  # ValueError when the shapes differ
    mean = maps.mean(axis=0)
    peak = float(mean.max())
    saliency = (mean / peak if peak > 0 else mean).astype(np.float32)
    attributions: tuple[FeatureAttribution, ...] = ()
    if all(e.attributions for e in explanations):
        names = [a.name for a in explanations[0].attributions]
        values = np.mean([[a.attribution for a in e.attributions] for e in explanations], axis=0)
        attributions = tuple(FeatureAttribution(n, float(v)) for n, v in zip(names, values, strict=True))
    return Explanation(probability=float(np.mean([e.probability for e in explanations])), saliency=saliency,
                       attributions=attributions)


def save_overlay(
    image: np.ndarray,
    saliency: np.ndarray,
    path: Path,
    *,
    title: str | None = None,
    mark: tuple[float, float, float] | None = None,
) -> Path:
    """PNG of the image's first channel with the saliency map as a heat overlay; a volume is shown at the
    slice that holds the map's peak (where the model looked), named in the title.

    `mark` = (row, column, radius) as fractions of the image draws a circle, e.g. a known lesion.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = np.asarray(image)[0]
    heat = np.asarray(saliency)
    if base.ndim == 3 and heat.shape == base.shape:  # 3D: the slice of the saliency peak
        k = int(np.unravel_index(int(np.argmax(heat)), heat.shape)[0])
        base, heat = base[k], heat[k]
        title = f"{title} | slice {k + 1}/{np.asarray(saliency).shape[0]}" if title else f"slice {k + 1}"
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4), dpi=110)
    axes[0].imshow(base, cmap="gray")
    axes[0].set_title("input")
    axes[1].imshow(base, cmap="gray")
    rgba = plt.get_cmap("jet")(np.clip(heat, 0.0, 1.0))
    rgba[..., 3] = 0.65 * np.clip(heat, 0.0, 1.0)  # low saliency stays transparent: the anatomy shows through
    axes[1].imshow(rgba)
    shown = plt.cm.ScalarMappable(cmap="jet", norm=plt.Normalize(0.0, 1.0))
    axes[1].set_title("Grad-CAM")
    for ax in axes:
        ax.axis("off")
        if mark is not None:
            rows, cols = base.shape
            circle = plt.Circle(
                (mark[1] * (cols - 1), mark[0] * (rows - 1)),
                mark[2] * cols,
                fill=False,
                color="#00e5ff",
                lw=1,
            )
            ax.add_patch(circle)
    fig.colorbar(shown, ax=list(axes), fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


__all__ = [
    "IG_STEPS",
    "TARGET_LAYERS",
    "Explanation",
    "FeatureAttribution",
    "average_explanations",
    "explain",
    "grad_cam",
    "integrated_gradients",
    "save_overlay",
]
