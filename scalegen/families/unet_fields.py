"""The UNet settings and constructor shared by the families whose network is `scalegen.nets.unet.UNet`
(diffusion's noise predictor, flow matching's velocity field): one declaration of the keys, one place that
turns them and the data's shape into the network."""

from __future__ import annotations

from dataclasses import dataclass

from scalegen.config.schema import ranged
from scalegen.dataspec import DataSpec
from scalegen.families.base import recipe_shapes
from scalegen.nets.unet import UNet


@dataclass
class UNetFields:
    # UNet (Ho et al. appendix B: CIFAR-10 uses 128 channels, mult 1,2,2,2, 2 blocks, attention at 16x16).
    base_channels: int = ranged(128, ge=1)  # channels at full resolution
    channel_mult: list[int] = ranged(ge=1, default_factory=lambda: [1, 2, 2, 2])  # width multiplier per level
    num_res_blocks: int = ranged(2, ge=1)  # residual blocks per level
    attn_resolutions: list[int] = ranged(ge=1, default_factory=lambda: [16])  # feature-map sizes with attention
    num_heads: int = ranged(1, ge=1)  # attention heads
    dropout: float = ranged(0.1, ge=0, le=1)  # residual-block dropout (0.1 on CIFAR-10 in Ho et al.)
    class_conditional: bool = False  # add a label embedding (y = -1 or none = unconditional)


def build_unet(cfg: UNetFields, data: DataSpec, family: str) -> UNet:
    """The UNet of these settings for images of `data.shape` (a shape it cannot take: a one-line ConfigError)."""
    channels, height, width = data.shape
    with recipe_shapes(family):
        return UNet(
            in_channels=channels, resolution=min(height, width), base_channels=cfg.base_channels,
            channel_mult=tuple(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
            attn_resolutions=tuple(cfg.attn_resolutions), dropout=cfg.dropout, num_heads=cfg.num_heads,
            num_classes=data.num_classes if cfg.class_conditional else 0,
        )
