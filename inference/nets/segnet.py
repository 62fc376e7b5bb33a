"""Segmentation networks: the MONAI families a segmenter card may name (`card.segmenter.ARCHS`)."""
from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import SegResNet, UNet
from torch import nn

from dicom_fusion.inference.card.segmenter import ARCHS

DEFAULT_FEATURES = (8, 16, 32, 64)


def build_segnet(arch: str, spatial_dims: int, *, in_channels: int = 1,
                 features: Sequence[int] = DEFAULT_FEATURES) -> nn.Module:
    """A two-class (background, lesion) MONAI network; `features` are the channels per resolution level.

    "unet": `monai.networks.nets.UNet` with one residual unit per level (strided convolutions down,
    transposed convolutions up). "segresnet": `SegResNet` with `features[0]` initial filters and one
    down-sampling per further level (blocks_down 1, 1, ..., 2), so both have the same depth.
    """
    features = tuple(int(f) for f in features)
    if len(features) < 2:
        raise ValueError(f"features needs at least two levels, got {features}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if arch == "unet":
        return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2, channels=features,
                    strides=(2,) * (len(features) - 1), num_res_units=1)
    if arch == "segresnet":
        levels = len(features)
        blocks_down = (*([1] * (levels - 1)), 2)  # lighter than MONAI's (1, 2, 2, 4): CPU training
        return SegResNet(spatial_dims=spatial_dims, init_filters=features[0], in_channels=in_channels,
                         out_channels=2, blocks_down=blocks_down, blocks_up=(1,) * (levels - 1))
    raise ValueError(f"arch {arch!r} is unknown; use one of {', '.join(ARCHS)}")
