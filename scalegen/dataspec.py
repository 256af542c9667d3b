"""The data contract: what a family knows about its data, and the uint8 <-> model-domain conversions.

A leaf module: data/, families/, eval/ and the runtime all import it, and it imports nothing of scalegen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class DataSpec:
    """What a family needs to know about its data; read from the shards' manifest.json."""

    kind: str = "image"  # image | audio
    shape: tuple[int, ...] = (1, 8, 8)  # one example: (C, H, W) images, (1, T) audio
    num_classes: int = 10
    class_names: list[str] = field(default_factory=list)
    levels: int = 256  # quantization levels of the stored data (uint8 images: 256; mu-law audio: its levels)
    sample_rate: int | None = None  # audio only

    @property
    def dims(self) -> int:
        return math.prod(self.shape)


def images_to_unit(x: Tensor, levels: int = 256) -> Tensor:
    """uint8 images (0..255) holding `levels` grey levels -> float32 on the `levels`-point grid in [-1, 1]."""
    k = torch.round(x.float() * (levels - 1) / 255.0)  # level index 0..levels-1
    return k * (2.0 / (levels - 1)) - 1.0


def unit_to_images(x: Tensor, levels: int = 256) -> Tensor:
    """Floats in [-1, 1] -> uint8 images, quantized to the nearest of `levels` grey levels."""
    k = torch.round((x.float().clamp(-1, 1) + 1) * (levels - 1) / 2)
    return torch.round(k * 255.0 / (levels - 1)).to(torch.uint8)
