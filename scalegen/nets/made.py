"""MADE: a masked MLP whose output i depends only on inputs < i (Germain et al. 2015), with an optional
context vector that every output may depend on (the h of an inverse autoregressive flow step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaskedLinear(nn.Linear):
    def __init__(self, in_dim: int, out_dim: int, mask: Tensor) -> None:
        super().__init__(in_dim, out_dim)
        self.register_buffer("mask", mask.float())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """z [..., D] (and context [..., C]) -> (mean, gate_logit), each [..., D], autoregressive in z's order.

    Hidden unit degrees cycle through 1..D-1; a hidden unit of degree d sees inputs 1..d and feeds
    outputs d+1..D, so output 1 depends on the context alone. gate_logit starts near +`gate_bias`
    (sigmoid ~ 1: the step starts close to the identity, Kingma et al. 2016, section 4)."""

    def __init__(self, dim: int, hidden: int, context_dim: int = 0, gate_bias: float = 2.0) -> None:
        super().__init__()
        self.dim = dim
        inp = torch.arange(1, dim + 1)
        deg = torch.arange(hidden) % max(1, dim - 1) + 1
        self.inp = MaskedLinear(dim, hidden, deg[:, None] >= inp[None, :])
        self.context = nn.Linear(context_dim, hidden) if context_dim else None
        self.mid = MaskedLinear(hidden, hidden, deg[:, None] >= deg[None, :])
        out_mask = inp[:, None] > deg[None, :]
        self.out = MaskedLinear(hidden, 2 * dim, torch.cat([out_mask, out_mask]))
        with torch.no_grad():  # small initial outputs: the flow starts near the identity
            self.out.weight.mul_(0.01)
            self.out.bias.zero_()
            self.out.bias[dim:] = gate_bias

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.inp(z)
        if self.context is not None and context is not None:
            h = h + self.context(context)
        h = self.mid(F.elu(h))
        mean, gate = self.out(F.elu(h)).chunk(2, -1)
        return mean, gate
