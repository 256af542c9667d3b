"""Convolutional encoder and decoder for images of any size: odd (7x7) and non-square (20x24) included."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def downsampled_sizes(size: int, stages: int) -> list[int]:
    """Spatial size after each stride-2 stage: [size, ceil(size/2), ...]."""
    sizes = [size]
    for _ in range(stages):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def stage_sizes(size: tuple[int, int], stages: int) -> list[tuple[int, int]]:
    """(height, width) after each stride-2 stage, from `size` down."""
    return list(zip(downsampled_sizes(size[0], stages), downsampled_sizes(size[1], stages)))


class ConvEncoder(nn.Module):
    """Stride-2 conv stages (one per entry of `widths`) over [C, H, W] images of `size` (H, W), then a linear
    map to `out_dim`."""

    def __init__(self, in_channels: int, size: tuple[int, int], widths: Sequence[int], out_dim: int,
                 extra_dim: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.SiLU()]
            c = w
        self.convs = nn.Sequential(*layers)
        h, w = stage_sizes(size, len(widths))[-1]
        self.head = nn.Linear(c * h * w + extra_dim, out_dim)

    def forward(self, x: Tensor, extra: Tensor | None = None) -> Tensor:
        h = self.convs(x).flatten(1)
        if extra is not None:
            h = torch.cat([h, extra], 1)
        return self.head(h)


class ConvDecoder(nn.Module):
    """Linear map to a small feature map, then (upsample to the encoder's sizes, conv) stages up to images of
    `size` (H, W)."""

    def __init__(self, in_dim: int, out_channels: int, size: tuple[int, int], widths: Sequence[int]) -> None:
        super().__init__()
        widths = list(reversed(widths))
        self.sizes = list(reversed(stage_sizes(size, len(widths))))  # small -> large
        self.c0 = widths[0]
        self.fc = nn.Linear(in_dim, widths[0] * self.sizes[0][0] * self.sizes[0][1])
        self.stages = nn.ModuleList()
        for i, w in enumerate(widths):
            nxt = widths[i + 1] if i + 1 < len(widths) else widths[-1]
            self.stages.append(nn.Sequential(nn.Upsample(size=self.sizes[i + 1]), nn.Conv2d(w, nxt, 3, padding=1),
                                             nn.SiLU()))
        self.out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).view(len(z), self.c0, *self.sizes[0])
        for stage in self.stages:
            h = stage(h)
        return self.out(h)
