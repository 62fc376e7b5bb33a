"""Batched prediction across studies: one forward pass for many prepared studies.

`Predictor.predict` runs one study per forward pass, which is what the gpu worker does today (one
Celery task = one study). `predict_batch` stacks many studies into one pass and gives the same
results (same network, eval mode; a unit test compares them). On CUDA it can also run under
autocast (bfloat16 by default), stage the inputs in pinned host memory and copy them asynchronously,
and use channels-last memory format for the CNN; on the CPU these switches are ignored, except
channels-last, which is accepted but rarely helps small CNNs there.

It lives beside `predict.py` rather than in it so that the single-study path stays as it is; a
micro-batching gpu worker (collect the `infer` tasks that are waiting, predict them together) would call
this function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from dicom_fusion.inference.data.images import PreparedImage
from dicom_fusion.inference.data.timeline_tensor import TimelineTensor
from dicom_fusion.inference.nets.hybrid import collate_timelines
from dicom_fusion.inference.serve.predict import (
    NO_TIMELINE,
    InferenceResult,
    Member,
    Predictor,
    calibrated_probabilities,
    calibration_label,
    choose_finding,
    member_spread,
    uncertainty_line,
)


@dataclass(frozen=True)
class BatchOptions:
    """How `predict_batch` runs the forward pass (CUDA-only switches are no-ops on the CPU)."""

    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 on CUDA; None = full precision
    pin_memory: bool = False  # CUDA: pinned host staging + non_blocking copies
    channels_last: bool = False  # NHWC for the image tensor (and the model, see `prepare_model`)

    @classmethod
    def for_device(cls, device: torch.device) -> BatchOptions:
        """Good defaults: on CUDA bfloat16 autocast (when supported), pinned memory, channels-last."""
        if device.type != "cuda":
            return cls()
        bf16 = torch.cuda.is_bf16_supported()
        return cls(autocast_dtype=torch.bfloat16 if bf16 else torch.float16, pin_memory=True, channels_last=True)


def prepare_model(predictor: Predictor, options: BatchOptions) -> None:
    """Put the loaded model in the memory format the options ask for (once, before predicting)."""
    if options.channels_last and predictor.card.image.spatial_dims == 2:
        for member in predictor.members:
            member.model.to(memory_format=torch.channels_last)


def _image_batch(predictor: Predictor, images: Sequence[PreparedImage | np.ndarray],
                 options: BatchOptions) -> torch.Tensor:
    host = torch.from_numpy(predictor.network_input(images))
    cuda = predictor.device.type == "cuda"
    if cuda and options.pin_memory:
        host = host.pin_memory()
    x = host.to(predictor.device, non_blocking=cuda and options.pin_memory)
    if options.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _member_probabilities(predictor: Predictor, member: Member, x: torch.Tensor,
                          timelines: Sequence[TimelineTensor | None], opts: BatchOptions) -> np.ndarray:
    """Softmax probabilities [N, classes] of one network of the predictor for the whole batch."""
    tl = collate_timelines([predictor.member_timeline(member, t) for t in timelines], member.card.timeline)
    cuda = predictor.device.type == "cuda"
    if cuda and opts.pin_memory:
        values, mask, deltas = (t.pin_memory().to(predictor.device, non_blocking=True)
                                for t in (tl.values, tl.mask, tl.deltas))
        has = tl.has_timeline.to(predictor.device)
    else:
        moved = tl.to(predictor.device)
        values, mask, deltas, has = moved.values, moved.mask, moved.deltas, moved.has_timeline
    lengths = tl.lengths  # stays on the CPU (pack_padded_sequence)
    with torch.inference_mode():
        if cuda and opts.autocast_dtype is not None:
            with torch.autocast("cuda", dtype=opts.autocast_dtype):
                logits = member.model(x, values, mask, deltas, lengths, has)
        else:
            logits = member.model(x, values, mask, deltas, lengths, has)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()


def predict_batch(
    predictor: Predictor,
    images: Sequence[PreparedImage | np.ndarray],
    timelines: Sequence[TimelineTensor | None],
    image_only_reasons: Sequence[str | None] | None = None,
    options: BatchOptions | None = None,
) -> list[InferenceResult]:
    """`Predictor.predict` for many studies in one forward pass; results in input order."""
    if len(images) != len(timelines):
        raise ValueError(f"{len(images)} images but {len(timelines)} timelines; pass one (or None) per image")
    if not images:
        return []
    reasons = list(image_only_reasons) if image_only_reasons is not None else [None] * len(images)
    if len(reasons) != len(images):
        raise ValueError(f"{len(images)} images but {len(reasons)} image-only reasons")
    opts = options or BatchOptions()
    card = predictor.card
    x = _image_batch(predictor, images, opts)
    per_member = [_member_probabilities(predictor, member, x, timelines, opts) for member in predictor.members]
    probs = np.mean(per_member, axis=0)
    # `positive_class` is newer than some InferenceResult versions this module meets: set it when present.
    extra = ({"positive_class": card.classes[card.positive_index].name}
             if "positive_class" in {f.name for f in fields(InferenceResult)} else {})
    results = []
    for i, (row, timeline, reason) in enumerate(zip(probs, timelines, reasons, strict=True)):
        image_only = timeline is None
        probabilities = calibrated_probabilities(card, row.tolist(), image_only=image_only)
        raw = [float(m[i, card.positive_index]) for m in per_member]
        spread = member_spread(card, raw, image_only=image_only)
        finding, why = choose_finding(card, probabilities, spread)
        results.append(InferenceResult(
            model_name=card.name,
            model_version=card.version,
            probabilities=probabilities,
            finding=finding,
            image_only=image_only,
            image_only_reason=(reason or NO_TIMELINE) if image_only else None,
            calibration=calibration_label(card, image_only),
            uncertainty="" if spread is None else uncertainty_line(card, len(per_member), spread),
            spread=spread,
            indeterminate_reason=why,
            **extra,
        ))
    return results


__all__ = ["BatchOptions", "predict_batch", "prepare_model"]
