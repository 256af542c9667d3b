"""Diffusion samplers as functions of (net, schedule, noise): DDPM ancestral sampling and DDIM.

`noise` is x_T [B, ...]; the per-step noise comes from `generator` (a torch.Generator, or the global
RNG when None) in a fixed order, one standard-normal draw of x's shape per stochastic step, so two
samplers given the same generator state see the same noise. The update arithmetic runs in float64;
both return x_0 in noise's dtype, in [-1, 1] up to the last step's Gaussian noise-free mean (x0-hat
clipped to [-1, 1] at every step when `clip_denoised`, as Ho et al. do for images).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from scalegen.objectives.diffusion import Net, NoiseSchedule, p_mean_variance, predict_x0_eps

Progress = Callable[[int, int], None]


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


@torch.no_grad()
def ddpm_sample(net: Net, schedule: NoiseSchedule, noise: Tensor, y: Tensor | None = None, *,
                prediction: str = "eps", variance: str = "beta", clip_denoised: bool = True,
                generator: torch.Generator | None = None, progress: Progress | None = None) -> Tensor:
    """Ancestral sampling, Ho et al. 2020 Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, t = T..1.

    sigma_t^2 is beta_t (`variance="beta"`) or beta-tilde_t (`"posterior"`); no noise is added at t = 1.
    """
    x = noise.double()
    T = schedule.timesteps
    for step in reversed(range(T)):
        i = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        mean, logvar, _ = p_mean_variance(net, schedule, x.to(noise.dtype), i, y, prediction=prediction,
                                          variance=variance, clip_denoised=clip_denoised)
        x = mean + (torch.exp(0.5 * logvar) * _randn(x, generator) if step > 0 else 0)
        if progress is not None:
            progress(T - step, T)
    return x.to(noise.dtype)


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """The `steps` timestep indices DDIM visits, evenly spaced over 0..T-1 and always ending at 0 ("linear"
    sub-sequence of Song et al. 2021, sec. 4.2 / appendix D.2), in decreasing order."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must be in 1..{timesteps}, got {steps}")
    seq = torch.linspace(0, timesteps - 1, steps).round().long().unique().tolist()
    return sorted(seq, reverse=True)


@torch.no_grad()
def ddim_sample(net: Net, schedule: NoiseSchedule, noise: Tensor, y: Tensor | None = None, *, steps: int = 50,
                eta: float = 0.0, prediction: str = "eps", clip_denoised: bool = True,
                generator: torch.Generator | None = None, progress: Progress | None = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) over a sub-sequence tau of `steps` timesteps:

    x_{tau_{s-1}} = sqrt(a_prev) x0-hat + sqrt(1 - a_prev - sigma^2) eps-hat + sigma z,
    sigma = eta sqrt((1 - a_prev)/(1 - a) (1 - a/a_prev))   (eq. 16), a = alpha-bar at tau_s.

    eta = 0 is the deterministic DDIM; eta = 1 with every step is DDPM ancestral sampling with
    sigma_t^2 = beta-tilde_t (the same update, term by term).
    """
    x = noise.double()
    seq = ddim_timesteps(schedule.timesteps, steps)
    ac = schedule.array("alphas_cumprod", x.device)
    for n, step in enumerate(seq):
        i = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x0, eps = predict_x0_eps(schedule, x, i, net(x.to(noise.dtype), i, y), prediction)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            # Re-derive eps-hat from the clipped x0-hat so the update stays on the same trajectory family.
            eps = (x - ac[step].sqrt() * x0) / (1 - ac[step]).sqrt()
        a = ac[step]
        a_prev = ac[seq[n + 1]] if n + 1 < len(seq) else torch.ones((), dtype=ac.dtype, device=ac.device)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
        if n + 1 < len(seq) and eta > 0:
            x = x + sigma * _randn(x, generator)
        if progress is not None:
            progress(n + 1, len(seq))
    return x.to(noise.dtype)
