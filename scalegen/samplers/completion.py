"""Completion (inpainting): draw the missing pixels of an image given the observed ones.

Every function takes the model's network (or its encode/decode pair), the observed images and a mask,
and returns completions in the network's own domain. `mask` is True (1) where a value is OBSERVED and
kept, False (0) where it is missing and drawn; it broadcasts against the images ([B or 1, 1 or C, H, W]).
Observed values come back unchanged.

- `complete_autoregressive` (PixelCNN): the missing sub-pixels are drawn in the net's raster order,
  each from p(x_i | every value before i), observed or already drawn. This is exact sampling from
  p(x_missing | x_observed) when every missing value comes after every observed one in raster order
  (`bottom`, or a box reaching the bottom-right corner row by row); for other masks the observed
  values AFTER a missing one are ignored when it is drawn (they are only kept), so the draw comes
  from p(x_i | x_<i), not from the conditional given the whole observation.
- `complete_diffusion` (DDPM): at every reverse step the known region is replaced by the forward
  process applied to the observation, x_{t-1}[known] ~ q(x_{t-1} | x_0) (Lugmayr et al. 2022, eq. 8);
  `resample` > 1 is RePaint's resampling: each step is undone by one forward step
  x_t ~ N(sqrt(1 - beta_t) x_{t-1}, beta_t I) and redone, `resample` times in all (their Algorithm 1
  with jump length 1), which lets the generated region agree with the known one.
- `complete_latent` (VAE): Rezende et al. 2014, sec. 6 / appendix F: start the missing pixels at a
  fill value, then iterate x <- paste(observed, decode(encode(x))) with z ~ q(z | x) and x ~ p(x | z);
  a Markov chain whose stationary distribution approximates p(x_missing | x_observed) when q is close
  to the true posterior.
- `complete_langevin` (energy models): Langevin dynamics on the conditional energy
  x_missing -> E(paste(observed, x_missing)), whose density exp(-E) restricted to the missing values is
  p(x_missing | x_observed) up to its normalizer; with noise sqrt(step size) and small steps the chain
  samples that conditional, with the EBM papers' smaller noise it is a short-run approximation (as their
  samples are).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from scalegen.objectives.diffusion import Net, NoiseSchedule, p_mean_variance, q_sample
from scalegen.samplers.autoregressive import draw
from scalegen.samplers.langevin import EnergyFn, sgld


def paste(observed: Tensor, drawn: Tensor, mask: Tensor) -> Tensor:
    """Observed values where mask is True, drawn values elsewhere (shapes broadcast)."""
    return torch.where(mask.bool(), observed, drawn)


def repeat_each(t: Tensor | None, n: int) -> Tensor | None:
    """[B, ...] -> [B * n, ...] with each example repeated n times in a row (completions of one image together)."""
    return None if t is None else t.repeat_interleave(n, 0)


def is_raster_suffix(mask: Tensor) -> bool:
    """Whether, for every image, every missing value comes after every observed one in raster (row,
    column, channel) order: then `complete_autoregressive` samples the exact conditional."""
    m = mask.bool()
    flat = m.permute(0, 2, 3, 1).reshape(m.shape[0], -1)  # raster order: row, column, then channel
    first_missing = torch.where((~flat).any(1), (~flat).float().argmax(1), flat.shape[1])
    pos = torch.arange(flat.shape[1], device=flat.device)
    return bool(((pos[None] >= first_missing[:, None]) <= ~flat).all())


@torch.no_grad()
def complete_autoregressive(net: torch.nn.Module, observed: Tensor, mask: Tensor, y: Tensor | None = None,
                            temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Fill the missing values of integer images [B, C, H, W] from a raster-order net(x, y) -> logits
    [B, K, C, H, W], one pass per missing position (positions every image observes are skipped)."""
    mask = mask.bool().expand_as(observed)
    x = torch.where(mask, observed, torch.zeros_like(observed))  # the net never reads values at or after i
    _, c, h, w = x.shape
    for row in range(h):
        for col in range(w):
            for ch in range(c):
                missing = ~mask[:, ch, row, col]
                if not bool(missing.any()):
                    continue
                logits = net(x, y)[:, :, ch, row, col]
                value = draw(logits, temperature, generator).to(x.dtype)
                x[:, ch, row, col] = torch.where(missing, value, x[:, ch, row, col])
    return x


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


@torch.no_grad()
def complete_diffusion(net: Net, schedule: NoiseSchedule, observed: Tensor, mask: Tensor, y: Tensor | None = None,
                       *, resample: int = 1, prediction: str = "eps", variance: str = "beta",
                       clip_denoised: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Inpaint x_0 in [-1, 1] [B, C, H, W] by DDPM ancestral sampling with the known region replaced at
    every step (RePaint, Lugmayr et al. 2022; `resample` = their r, jump length 1)."""
    if resample < 1:
        raise ValueError(f"resample must be >= 1, got {resample}")
    x0 = observed.double()
    m = mask.bool()
    betas = schedule.array("betas", x0.device)
    x = _randn(x0, generator)
    for step in reversed(range(schedule.timesteps)):
        i = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        for r in range(resample):
            # Known region: the observation noised to t-1 (exactly the observation at the last step).
            known = q_sample(schedule, x0, i - 1, _randn(x0, generator)) if step > 0 else x0
            mean, logvar, _ = p_mean_variance(net, schedule, x.to(observed.dtype), i, y, prediction=prediction,
                                              variance=variance, clip_denoised=clip_denoised)
            unknown = mean + (torch.exp(0.5 * logvar) * _randn(x, generator) if step > 0 else 0)
            x_prev = paste(known, unknown, m)
            if r + 1 < resample and step > 0:  # undo the step: x_t ~ q(x_t | x_{t-1}) (RePaint Alg. 1 line 10)
                x = (1 - betas[step]).sqrt() * x_prev + betas[step].sqrt() * _randn(x_prev, generator)
            else:
                x = x_prev
    return paste(x0, x, m).to(observed.dtype)


@torch.no_grad()
def complete_latent(encode: Callable[[Tensor], Tensor], decode: Callable[[Tensor], Tensor], observed: Tensor,
                    mask: Tensor, steps: int = 50, fill: float = 0.5) -> Tensor:
    """Rezende et al. 2014's iterated encode-decode with the observed values clamped.

    `encode(x) -> z` draws z ~ q(z | x) and `decode(z) -> x` draws x ~ p(x | z) (or its mean), both in
    the same domain as `observed`; missing values start at `fill`. Returns the chain's state after `steps`
    iterations."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    m = mask.bool()
    x = paste(observed, torch.full_like(observed, fill), m)
    for _ in range(steps):
        x = paste(observed, decode(encode(x)).to(observed.dtype), m)
    return x


def complete_langevin(energy: EnergyFn, observed: Tensor, mask: Tensor, start: Tensor, steps: int, step_size: float,
                      noise_scale: float | None = None, grad_clip: float | None = None,
                      clamp: tuple[float, float] | None = None, generator: torch.Generator | None = None) -> Tensor:
    """`steps` Langevin updates of the missing values from `start` (the observed ones are held fixed):
    the energy only ever sees observed values where mask is True, so their gradient is zero and the
    noise added there is discarded."""
    m = mask.bool()
    x = sgld(lambda v: energy(paste(observed, v, m)), paste(observed, start, m), steps, step_size, noise_scale,
             grad_clip, clamp=clamp, generator=generator)
    return paste(observed, x, m)
