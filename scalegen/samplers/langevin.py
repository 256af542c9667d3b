"""Langevin samplers for energy and score models: functions of (energy or score fn, x0, settings).

`sgld` is the short-run stochastic-gradient Langevin dynamics of IGEBM (Du & Mordatch 2019) and JEM
(Grathwohl et al. 2020): x <- x - (a/2) dE/dx + sigma * noise, with the step size a and the noise scale
sigma set separately (sigma = sqrt(a) is the Langevin diffusion that leaves exp(-E) invariant as a -> 0;
the EBM papers use a much smaller sigma). `annealed_langevin` is Algorithm 1 of Song & Ermon (2019)
over a noise ladder sigma_1 > ... > sigma_L for score models.

Both only ask autograd for gradients with respect to x (never the parameters), so the negatives they
return carry no graph to the network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

EnergyFn = Callable[[Tensor], Tensor]  # x [B, ...] -> energies [B]
ScoreFn = Callable[[Tensor, int], Tensor]  # (x [B, ...], level index i) -> score grad_x log p_sigma_i(x)


def energy_grad(energy: EnergyFn, x: Tensor) -> Tensor:
    """dE/dx for each example (rows are independent, so the gradient of the sum is each row's gradient)."""
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        return torch.autograd.grad(energy(xg).sum(), xg)[0]


def clip_rows(g: Tensor, max_norm: float) -> Tensor:
    """Scale each example's gradient down to L2 norm <= max_norm (rows within the limit are unchanged)."""
    norms = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (max_norm / norms).clamp(max=1.0)
    return g * scale.view(-1, *([1] * (g.dim() - 1)))


def sgld(energy: EnergyFn, x0: Tensor, steps: int, step_size: float, noise_scale: float | None = None,
         grad_clip: float | None = None, clamp: tuple[float, float] | None = None,
         generator: torch.Generator | None = None) -> Tensor:
    """`steps` updates x <- x - (step_size/2) dE/dx + noise_scale * N(0, I) from x0 (returned detached).

    noise_scale None = sqrt(step_size) (unadjusted Langevin); grad_clip bounds each example's gradient
    norm; clamp keeps x in a box (IGEBM/JEM keep images in the data range)."""
    sigma = step_size**0.5 if noise_scale is None else noise_scale
    x = x0.detach().clone()
    for _ in range(steps):
        g = energy_grad(energy, x)
        if grad_clip is not None:
            g = clip_rows(g, grad_clip)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x - 0.5 * step_size * g + sigma * noise
        if clamp is not None:
            x = x.clamp(*clamp)
    return x.detach()


def geometric_sigmas(sigma_max: float, sigma_min: float, levels: int) -> Tensor:
    """The NCSN noise ladder: `levels` values from sigma_max down to sigma_min in geometric progression."""
    if levels == 1:
        return torch.tensor([float(sigma_max)])
    return torch.logspace(torch.log10(torch.tensor(float(sigma_max))), torch.log10(torch.tensor(float(sigma_min))),
                          levels, dtype=torch.float64).float()


@torch.no_grad()
def annealed_langevin(score: ScoreFn, x0: Tensor, sigmas: Sequence[float] | Tensor, steps_per_level: int,
                      eps: float, final_denoise: bool = False, clamp: tuple[float, float] | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) from x0.

    For each level i (largest sigma first): alpha_i = eps * sigma_i^2 / sigma_L^2, then `steps_per_level`
    updates x <- x + (alpha_i / 2) s(x, i) + sqrt(alpha_i) z. final_denoise adds one Tweedie step
    x + sigma_L^2 s(x, L) (Jolicoeur-Martineau et al. 2021), which removes the last level's noise."""
    sig = [float(s) for s in sigmas]
    x = x0.detach().clone()
    for i, s in enumerate(sig):
        alpha = eps * (s / sig[-1]) ** 2
        for _ in range(steps_per_level):
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + 0.5 * alpha * score(x, i) + alpha**0.5 * z
            if clamp is not None:
                x = x.clamp(*clamp)
    if final_denoise:
        x = x + sig[-1] ** 2 * score(x, len(sig) - 1)
    return x
