"""Small noise-conditional networks for score models on vectors (images use `scalegen.nets.unet.UNet` with
the level index as its time input)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LevelMLP(nn.Module):
    """An MLP on [x, embedding(level)] -> vector of x's size (SiLU between layers)."""

    def __init__(self, dim: int, hidden: int, num_levels: int, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_levels, hidden)
        layers: list[nn.Module] = [nn.Linear(dim + hidden, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, levels: Tensor) -> Tensor:
        return self.net(torch.cat([x, self.embed(levels)], 1))
