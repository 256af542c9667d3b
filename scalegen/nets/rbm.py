"""Restricted Boltzmann machine parameters: weights W [V, H], visible biases b [V], hidden biases c [H]."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RBMParams(nn.Module):
    """The weights and biases of an RBM; the energy, free energy and samplers are in scalegen.objectives.rbm.

    Initialization follows Hinton's practical guide (2010): W ~ N(0, init_std^2), hidden biases 0, visible
    biases 0 (the family sets them to log p/(1-p) of the data marginals when it sees data)."""

    def __init__(self, visible: int, hidden: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(visible, hidden) * init_std)
        self.b = nn.Parameter(torch.zeros(visible))
        self.c = nn.Parameter(torch.zeros(hidden))

    def hidden_logits(self, v: Tensor) -> Tensor:
        return v @ self.W + self.c

    def visible_logits(self, h: Tensor) -> Tensor:
        """Bernoulli visibles: logits of p(v=1|h); Gaussian visibles: the mean of p(v|h)."""
        return h @ self.W.t() + self.b
