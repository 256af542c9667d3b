"""Ancestral sampling for autoregressive nets: draw x_i ~ p(x_i | x_<i) one dimension at a time.

Images: one full forward pass per (row, column, channel) in raster order (the net is causal, so
the not-yet-drawn zeros never influence the logits that are read). Sequences: the net's
incremental `step` interface with per-layer caches (Paine et al. 2016, "Fast WaveNet"), O(layers)
work per sample instead of a pass over the receptive field.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


def draw(logits: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of logits [N, K] (K = 1: a Bernoulli logit) at `temperature`; T = 0 is argmax."""
    if logits.shape[1] == 1:
        logit = logits[:, 0].float()
        if temperature == 0:
            return (logit > 0).long()
        p = torch.sigmoid(logit / temperature)
        return torch.bernoulli(p, generator=generator).long()
    if temperature == 0:
        return logits.argmax(1)
    probs = torch.softmax(logits.float() / temperature, 1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_image(net: torch.nn.Module, shape: tuple[int, int, int], n: int, y: Tensor | None = None,
                 temperature: float = 1.0, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.uint8) -> Tensor:
    """n images [n, C, H, W] (uint8 levels) from a raster-order net: net(x, y) -> logits [n, K, C, H, W].

    `dtype`: of the drawn levels; int64 for more than 256 (e.g. the codes of a VQ-VAE)."""
    c, h, w = shape
    device = next(net.parameters()).device
    x = torch.zeros(n, c, h, w, dtype=dtype, device=device)
    for row in range(h):
        for col in range(w):
            for ch in range(c):
                logits = net(x, y)[:, :, ch, row, col]
                x[:, ch, row, col] = draw(logits, temperature, generator).to(dtype)
    return x


class IncrementalNet(Protocol):
    def init_state(self, n: int, y: Tensor | None = None) -> list[Tensor]: ...

    def step(self, prev: Tensor | None, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]: ...


@torch.no_grad()
def sample_sequence(net: IncrementalNet, n: int, length: int, y: Tensor | None = None,
                    temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """n code sequences [n, length] from a causal sequence net with `init_state` / `step`."""
    state = net.init_state(n, y)
    prev: Tensor | None = None
    out = []
    for _ in range(length):
        logits, state = net.step(prev, state)
        prev = draw(logits, temperature, generator)
        out.append(prev)
    return torch.stack(out, 1)
