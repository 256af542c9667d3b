"""A map-style dataset of in-memory images in the batch format families train on, for Lightning tests."""

from __future__ import annotations

import torch


class Images(torch.utils.data.Dataset):
    """`{"x": x[i], "y": y[i]}` per index; without labels every `y` is -1 (unlabelled)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        self.x = x
        self.y = y if y is not None else torch.full((len(x),), -1, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}
