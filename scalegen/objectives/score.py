"""Denoising score matching over a noise ladder (Vincent 2011; Song & Ermon 2019, eq. 2 and 5).

For one level sigma, DSM is 1/2 E_{x ~ data, z ~ N(0,I)} ||s(x + sigma z) + z / sigma||^2, which equals
explicit score matching 1/2 E_{x~ ~ q_sigma} ||s(x~) - grad log q_sigma(x~)||^2 plus a constant independent
of s (Vincent 2011). NCSN weights level i by lambda(sigma_i) = sigma_i^2, so each term becomes
1/2 ||sigma_i s(x~, i) + z||^2, of the same scale at every level.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]  # (x~ [B, ...], level indices [B]) -> score [B, ...]


def dsm_per_example(score: ScoreFn, x: Tensor, sigmas: Tensor, levels: Tensor, noise: Tensor | None = None,
                    weighted: bool = True) -> Tensor:
    """Per-example DSM at the given level indices: 1/2 ||s(x~) + z/sigma||^2, times sigma^2 if `weighted`."""
    z = torch.randn_like(x) if noise is None else noise
    sigma = sigmas.to(x)[levels].view(-1, *([1] * (x.dim() - 1)))
    s = score(x + sigma * z, levels)
    if weighted:
        return 0.5 * (sigma * s + z).flatten(1).pow(2).sum(1)
    return 0.5 * (s + z / sigma).flatten(1).pow(2).sum(1)


def dsm_loss(score: ScoreFn, x: Tensor, sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """NCSN's objective (Song & Ermon 2019 eq. 6): a uniform random level per example; (loss, levels)."""
    levels = torch.randint(0, len(sigmas), (len(x),), device=x.device)
    return dsm_per_example(score, x, sigmas, levels).mean(), levels
