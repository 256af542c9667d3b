"""Maximum-likelihood training of energy-based models with short-run Langevin negatives (IGEBM, Du &
Mordatch 2019; JEM, Grathwohl et al. 2020), and the replay buffer the chains start from.

For p(x) = exp(-E(x)) / Z, d/dtheta -log p(x) = dE(x)/dtheta - E_{x- ~ p}[dE(x-)/dtheta]; with negatives x-
from SGLD (no graph to the parameters) the surrogate E(x+) - E(x-) has exactly this gradient. IGEBM adds
alpha (E(x+)^2 + E(x-)^2) to keep the energies near zero (sec. 3.3).
"""

from __future__ import annotations

import torch
from torch import Tensor


def ml_loss(e_pos: Tensor, e_neg: Tensor, energy_reg: float = 0.0) -> tuple[Tensor, Tensor]:
    """(mean E(x+) - mean E(x-) + energy_reg * mean(E(x+)^2 + E(x-)^2), the contrastive part alone)."""
    contrastive = e_pos.mean() - e_neg.mean()
    reg = (e_pos.pow(2).mean() + e_neg.pow(2).mean()) if energy_reg else e_pos.new_zeros(())
    return contrastive + energy_reg * reg, contrastive


def uniform_images(n: int, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """Uniform noise in [-1, 1]: where chains are (re)initialized."""
    return torch.rand(n, *shape, device=device) * 2 - 1


def buffer_starts(buffer: Tensor, batch: int, reinit_prob: float) -> tuple[Tensor, Tensor]:
    """(chain starts, buffer indices): `batch` random buffer entries, each replaced by fresh uniform noise
    with probability reinit_prob (IGEBM: 5 %). Write the chains' ends back to buffer[indices]."""
    idx = torch.randint(0, len(buffer), (batch,), device=buffer.device)
    fresh = torch.rand(batch, device=buffer.device) < reinit_prob
    # Noise for every row, kept where fresh: selecting only the fresh rows would read their count on the host.
    noise = uniform_images(batch, tuple(buffer.shape[1:]), buffer.device)
    return torch.where(fresh.view(-1, *[1] * (buffer.dim() - 1)), noise, buffer[idx]), idx
