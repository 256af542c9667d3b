"""Flow matching with conditional optimal-transport paths (Lipman et al. 2023, sec. 4.1; with
sigma_min = 0 it is rectified flow, Liu et al. 2023).

Convention (Lipman et al.'s): t = 0 is the prior x0 ~ N(0, I), t = 1 is the data x1. The conditional
path is Gaussian with mean t x1 and standard deviation 1 - (1 - sigma_min) t (eq. 20), i.e.

    x_t = t x1 + (1 - (1 - sigma_min) t) x0,        u_t = d x_t / dt = x1 - (1 - sigma_min) x0,

and the network v(x_t, t) regresses u_t (the conditional flow matching loss, eq. 23), whose minimizer
is the marginal velocity E[u_t | x_t] that carries N(0, I) to the data (Lipman et al. Theorem 2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Velocity = Callable[..., Tensor]  # v(x_t, t, y) -> a tensor shaped like x_t
TIME_SAMPLINGS = ("uniform", "logit_normal")


def _per_example(t: Tensor, like: Tensor) -> Tensor:
    """t [B] broadcast against [B, ...]."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def ot_path(x0: Tensor, x1: Tensor, t: Tensor, sigma_min: float = 0.0) -> Tensor:
    """x_t = t x1 + (1 - (1 - sigma_min) t) x0 (eq. 20's mean and standard deviation applied to x0)."""
    t = _per_example(t, x1)
    return t * x1 + (1 - (1 - sigma_min) * t) * x0


def ot_velocity(x0: Tensor, x1: Tensor, sigma_min: float = 0.0) -> Tensor:
    """The conditional target u_t = x1 - (1 - sigma_min) x0 (eq. 23), the same at every t."""
    return x1 - (1 - sigma_min) * x0


def sample_times(n: int, kind: str = "uniform", device: torch.device | str | None = None) -> Tensor:
    """n training times in [0, 1]: `uniform` (Lipman et al.) or `logit_normal`, t = sigmoid(z) with
    z ~ N(0, 1) (Esser et al. 2024 sec. 3.1, their best rf/lognorm(0.00, 1.00)), which puts more
    training on the middle of the path."""
    if kind == "uniform":
        return torch.rand(n, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, device=device))
    raise ValueError(f"time sampling {kind!r}; one of {', '.join(TIME_SAMPLINGS)}")


def flow_matching_loss(net: Velocity, x1: Tensor, x0: Tensor, t: Tensor, y: Tensor | None = None,
                       sigma_min: float = 0.0) -> Tensor:
    """Per-example conditional flow matching loss [B]: the mean over dimensions of
    (v(x_t, t, y) - u_t)^2 for data x1, prior draws x0 and times t [B] (eq. 23)."""
    xt = ot_path(x0, x1, t, sigma_min)
    err = net(xt, t, y) - ot_velocity(x0, x1, sigma_min)
    return err.float().pow(2).flatten(1).mean(1)
