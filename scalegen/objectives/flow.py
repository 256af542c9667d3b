"""Flow objectives: uniform dequantization and the negative log-likelihood of 8-bit data.

Convention (used by every scalegen likelihood family, see docs/families.md): an image x of D
integers in {0..255} is dequantized to u = (x + v) / 256 with v ~ U[0,1)^D. A flow gives the exact
density p(u) on [0,1)^D; the NLL of the discrete data is reported as

    nll(x) = -log p(u) + D log 256        (nats)

which is the log-likelihood of the piecewise-constant discrete model P(x) = int p((x+v)/256) dv/256^D
estimated with one sample of v; by Jensen it upper-bounds -log P(x) in expectation (Theis et al.
2016, Sec. 3.1). bits/dim = nll / (D log 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

LEVELS = 256  # uint8 images


def uniform_dequantize(x: Tensor, levels: int = LEVELS, generator: torch.Generator | None = None) -> Tensor:
    """uint8 (or integer) x in {0..levels-1} -> u = (x + U[0,1)) / levels in [0,1)."""
    noise = torch.rand(x.shape, device=x.device, generator=generator)
    return (x.float() + noise) / levels


def quantize(u: Tensor, levels: int = LEVELS) -> Tensor:
    """Continuous u in [0,1) -> uint8 bins floor(u * levels), clamped to the valid range."""
    return torch.clamp(torch.floor(u * levels), 0, levels - 1).to(torch.uint8)


def flow_nll(log_prob: Callable[[Tensor], Tensor], x: Tensor, levels: int = LEVELS,
             generator: torch.Generator | None = None) -> Tensor:
    """Per-example NLL [B] in nats of the discrete data x, from a density `log_prob` on [0,1)^D."""
    u = uniform_dequantize(x, levels, generator)
    dims = math.prod(x.shape[1:])
    return -log_prob(u) + dims * math.log(levels)
