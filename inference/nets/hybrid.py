"""HybridNet: a MONAI CNN image encoder and an LSTM timeline encoder fused by fully connected layers.

The timeline branch reads, per time step, [values, mask, delta] (see timeline.py): the mask lets it
tell measured from imputed values and the delta how long ago the last event was. When a sample has no
timeline (`has_timeline` false) its timeline features are zeroed and the flag itself is an input of the
fusion head; training drops the timeline of random samples the same way (modality dropout), which is
what makes the image-only path of a deployed model meaningful.

`init_model` writes a deterministic, untrained checkpoint + card: the shipped default model, used to
exercise the pipeline end to end before a trained model is deployed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import DenseNet121, EfficientNetBN
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from dicom_fusion.inference.card.model import (
    ImageSpec,
    ModelCard,
    TimelineSpec,
    default_card,
    sha256_file,
    write_card,
)
from dicom_fusion.inference.data.timeline_tensor import TimelineTensor

IMAGE_FEATURES = 64
LSTM_HIDDEN = 32
FUSION_HIDDEN = 64
DROPOUT = 0.2
WEIGHTS_NAME = "weights.pt"
CARD_NAME = "card.toml"


class SmallCNN(nn.Module):
    """Four strided MONAI convolution blocks + global average *and* max pool: ~42 k parameters, ~2 ms
    on 128² CPU.

    Both pools, concatenated: the finding is a small lesion (~1 % of the image). Max pooling keeps
    "is there a lesion-like spot and how strong", which an average over the whole map dilutes;
    average pooling keeps "how much of the image looks like that", i.e. lesion size. On the synthetic
    cohort (600 patients, 3 folds, same recipe) the image-only CNN reached ROC-AUC 0.67 with max and
    0.72 with both; average alone collapsed to constant predictions in some folds.

    GroupNorm rather than BatchNorm: serving runs one study at a time and training batches are small,
    and with BatchNorm the running statistics made eval-mode predictions swing between epochs on the
    synthetic cohort (test ROC-AUC 0.29..0.77); GroupNorm behaves the same in train and eval mode.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_features: int = IMAGE_FEATURES) -> None:
        super().__init__()
        if out_features % 16:
            raise ValueError(f"SmallCNN out_features must be a multiple of 16, got {out_features}")
        widths = (16, 32, 64, out_features // 2)  # the two pools double the last width
        layers: list[nn.Module] = []
        prev = in_channels
        for width in widths:
            layers.append(
                Convolution(
                    spatial_dims,
                    prev,
                    width,
                    strides=2,
                    kernel_size=3,
                    act="RELU",
                    norm=("GROUP", {"num_groups": 8}),
                    adn_ordering="NDA",
                )
            )
            prev = width
        self.features = nn.Sequential(*layers)
        if spatial_dims == 2:
            self.avg_pool, self.max_pool = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)
        else:
            self.avg_pool, self.max_pool = nn.AdaptiveAvgPool3d(1), nn.AdaptiveMaxPool3d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x)
        pooled = (torch.flatten(self.avg_pool(maps), 1), torch.flatten(self.max_pool(maps), 1))
        return torch.cat(pooled, dim=1)


def build_image_encoder(spec: ImageSpec, out_features: int = IMAGE_FEATURES) -> nn.Module:
    """The card's encoder, outputting [B, out_features]; MONAI nets never download weights here."""
    if spec.encoder == "smallcnn":
        return SmallCNN(spec.spatial_dims, spec.network_channels, out_features)
    if spec.encoder == "densenet121":
        return DenseNet121(
            spatial_dims=spec.spatial_dims, in_channels=spec.network_channels, out_channels=out_features
        )
    if spec.encoder == "efficientnet-b0":
        return EfficientNetBN(
            "efficientnet-b0",
            pretrained=False,
            progress=False,
            spatial_dims=spec.spatial_dims,
            in_channels=spec.network_channels,
            num_classes=out_features,
        )
    raise ValueError(f"unknown image encoder {spec.encoder!r}")


class HybridNet(nn.Module):
    """Image encoder + LSTM timeline encoder + FC fusion head -> class logits [B, n_classes]."""

    def __init__(
        self,
        image: ImageSpec,
        n_timeline_features: int,
        n_classes: int,
        *,
        image_features: int = IMAGE_FEATURES,
        lstm_hidden: int = LSTM_HIDDEN,
        fusion_hidden: int = FUSION_HIDDEN,
        dropout: float = DROPOUT,
    ) -> None:
        super().__init__()
        self.n_timeline_features = n_timeline_features
        self.image_encoder = build_image_encoder(image, image_features)
        self.image_act = nn.ReLU() if image.encoder != "smallcnn" else nn.Identity()
        self.lstm = nn.LSTM(input_size=2 * n_timeline_features + 1, hidden_size=lstm_hidden, batch_first=True)
        self.head = nn.Sequential(
            nn.Linear(image_features + lstm_hidden + 1, fusion_hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(fusion_hidden, n_classes),
        )

    def timeline_lstm_features(
        self, values: torch.Tensor, mask: torch.Tensor, deltas: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Final LSTM hidden state over the valid steps of each sequence: [B, lstm_hidden]."""
        x = torch.cat([values, mask, deltas.unsqueeze(-1)], dim=-1)
        # A sample without timeline has length 0, which packing rejects: give it one (zero) step; its
        # features are zeroed by the caller anyway.
        steps = lengths.detach().to("cpu", torch.int64).clamp(min=1, max=x.shape[1])
        packed = pack_padded_sequence(x, steps, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        last: torch.Tensor = h_n[-1]
        return last

    def forward(
        self,
        image: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        deltas: torch.Tensor,
        lengths: torch.Tensor,
        has_timeline: torch.Tensor,
    ) -> torch.Tensor:
        """Logits for a batch. image [B, C, *size]; values/mask [B, T, F]; deltas [B, T]; lengths,
        has_timeline [B] (bool or 0/1)."""
        return self.fuse(self.image_cnn_features(image), values, mask, deltas, lengths, has_timeline)

    def image_cnn_features(self, image: torch.Tensor) -> torch.Tensor:
        """Image branch features [B, image_features]."""
        features: torch.Tensor = self.image_act(self.image_encoder(image))
        return features

    def fuse(
        self,
        image_features: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        deltas: torch.Tensor,
        lengths: torch.Tensor,
        has_timeline: torch.Tensor,
    ) -> torch.Tensor:
        """Logits from precomputed image features and the timeline inputs; `forward` without the CNN, so
        timeline attributions (explain.py) can run many timeline variants against one image pass."""
        flag = has_timeline.to(image_features.dtype).reshape(-1, 1)
        timeline_features = self.timeline_lstm_features(values, mask, deltas, lengths) * flag
        logits: torch.Tensor = self.head(torch.cat([image_features, timeline_features, flag], dim=1))
        return logits


@dataclass(frozen=True)
class TimelineBatch:
    """Timeline inputs of HybridNet.forward for a batch; samples without timeline are all-zero, flag off."""

    values: torch.Tensor  # [B, T, F] float32
    mask: torch.Tensor  # [B, T, F] float32
    deltas: torch.Tensor  # [B, T] float32
    lengths: torch.Tensor  # [B] int64, on the CPU (pack_padded_sequence wants it there)
    has_timeline: torch.Tensor  # [B] bool

    def to(self, device: torch.device | str) -> TimelineBatch:
        return TimelineBatch(
            self.values.to(device),
            self.mask.to(device),
            self.deltas.to(device),
            self.lengths,
            self.has_timeline.to(device),
        )


def collate_timelines(timelines: Sequence[TimelineTensor | None], spec: TimelineSpec) -> TimelineBatch:
    """Stack encoded timelines (None = no timeline for that sample) into HybridNet's timeline inputs.

    Checks every tensor against `spec`, so a timeline encoded for another card fails here with a
    message instead of deep inside the LSTM. Training code sets entries to None at random for
    modality dropout.
    """
    shape = (spec.n_bins, len(spec.features))
    values = np.zeros((len(timelines), *shape), np.float32)
    mask = np.zeros_like(values)
    deltas = np.zeros((len(timelines), shape[0]), np.float32)
    lengths = np.zeros(len(timelines), np.int64)
    for i, tl in enumerate(timelines):
        if tl is None:
            continue
        if tl.values.shape != shape or tl.mask.shape != shape or tl.deltas.shape != shape[:1]:
            raise ValueError(
                f"timeline has values {tl.values.shape}, mask {tl.mask.shape}, deltas {tl.deltas.shape} "
                f"but the card expects {shape} and ({shape[0]},); encode it with data.timeline_tensor.encode_timeline "
                "and this model's card.timeline"
            )
        if not 1 <= tl.length <= shape[0]:
            raise ValueError(f"timeline length {tl.length} is outside 1..{shape[0]}")
        values[i], mask[i], deltas[i], lengths[i] = tl.values, tl.mask, tl.deltas, tl.length
    return TimelineBatch(
        values=torch.from_numpy(values),
        mask=torch.from_numpy(mask),
        deltas=torch.from_numpy(deltas),
        lengths=torch.from_numpy(lengths),
        has_timeline=torch.tensor([tl is not None for tl in timelines], dtype=torch.bool),
    )


def build_model(card: ModelCard) -> HybridNet:
    """An untrained HybridNet shaped for `card` (encoder, channels, number of features and classes)."""
    return HybridNet(card.image, len(card.timeline.features), len(card.classes))


def init_model(out_dir: Path, seed: int) -> ModelCard:
    """Write a deterministic untrained checkpoint + the default card to `out_dir`; return the card.

    Same seed -> same bytes -> same sha256, so the committed default model can be regenerated and
    checked. The card is written last: a crash midway never leaves a card pointing at missing weights.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / WEIGHTS_NAME
    card_path = out_dir / CARD_NAME
    provisional = default_card(weights=weights_path, sha256="0" * 64, path=card_path)
    torch.manual_seed(seed)
    model = build_model(provisional)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=".weights-", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp_name, 0o644)  # mkstemp makes it owner-only; workers may run as another user
    os.replace(tmp_name, weights_path)
    card = default_card(weights=weights_path, sha256=sha256_file(weights_path), path=card_path)
    write_card(card, card_path)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dicom_fusion.inference.nets.hybrid --out DIR --seed 0`: write the default model."""
    parser = argparse.ArgumentParser(prog="python -m dicom_fusion.inference.nets.hybrid", description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="directory for card.toml + weights.pt")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the initial weights (default 0)")
    args = parser.parse_args(argv)
    card = init_model(args.out, args.seed)
    print(f"wrote {card.path} ({card.name} {card.version}) and {card.weights} sha256 {card.sha256}")
    return 0


__all__ = [
    "HybridNet",
    "SmallCNN",
    "TimelineBatch",
    "build_image_encoder",
    "build_model",
    "collate_timelines",
    "init_model",
    "main",
]


if __name__ == "__main__":
    raise SystemExit(main())
