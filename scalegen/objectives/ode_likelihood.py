"""Likelihoods of ODE models by the instantaneous change of variables (Chen et al. 2018, eq. 4).

A model with a velocity field v(x, t) (t = 0: the prior N(0, I); t = 1: the data, see
`GenerativeModel.velocity`) moves densities by d/dt log p_t(x_t) = -div v(x_t, t). Integrating the
augmented state (x, delta) with d delta/dt = div v from t = 1 (the data point, delta = 0) back to t = 0
gives x_0 and log p_1(x) = log N(x_0; 0, I) + delta(0), through `scalegen.samplers.ode.integrate`.

The divergence is exact (one backward pass per dimension, for small D) or Hutchinson's estimate
z^T (dv/dx) z with k probes z, E[z z^T] = I (Rademacher or Gaussian), drawn once per integration as in
FFJORD (Grathwohl et al. 2019), so that the estimate of log p is unbiased. Only likelihoods are computed
here: the outputs are detached (nothing trains through them), and gradients are switched on inside
even when the caller runs under `torch.no_grad`. The velocity must treat the rows of a batch
independently (no batch statistics): the divergence of row b is read off the gradient of the batch's sum.

Discrete data: `ode_nll` dequantizes the L-level grid that `dataspec.images_to_unit` puts the data on
(spacing w = 2/(L-1), grid points c) with uniform noise, y = c + w (u - 1/2), u ~ U[0, 1)^D, so each
value's bin is centred on the point the model was trained on (the same bins as the DDPM decoder's,
eq. 13 of Ho et al.). By Jensen, -log P(bin) <= E_u[-log p(y)] - D log w; one draw of u per example
is an unbiased estimate of that bound (Theis et al. 2016, sec. 3.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from scalegen.dataspec import images_to_unit
from scalegen.metrics.bpd import discrete_nll_from_density
from scalegen.samplers.ode import integrate

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x [B, ...], t [B]) -> dx/dt, shaped like x
PROBES = ("rademacher", "gaussian")


def exact_divergence(velocity: Velocity, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """v(x, t) and div v = sum_i dv_i/dx_i per example [B]: one backward pass per dimension."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x, t)
        flat = v.flatten(1)
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True, materialize_grads=True)
            div = div + g.flatten(1)[:, i]
    return v.detach(), div.detach()


def hutchinson_divergence(velocity: Velocity, x: Tensor, t: Tensor, probes: Tensor) -> tuple[Tensor, Tensor]:
    """v(x, t) and the mean over the probes z [k, *x.shape] of z^T (dv/dx) z per example [B]
    (one vector-Jacobian product per probe); unbiased for div v when E[z z^T] = I."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x, t)
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for z in probes:
            (vjp,) = torch.autograd.grad(v, x, grad_outputs=z, retain_graph=True, materialize_grads=True)
            total = total + (vjp * z).flatten(1).sum(1)
    return v.detach(), (total / len(probes)).detach()


def draw_probes(like: Tensor, k: int, kind: str = "rademacher", generator: torch.Generator | None = None) -> Tensor:
    """k probes shaped like `like` ([k, *like.shape]) with E[z z^T] = I: Rademacher (+-1) or standard normal."""
    if kind not in PROBES:
        raise ValueError(f"probe {kind!r}; one of {', '.join(PROBES)}")
    shape = (k, *like.shape)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """log N(x; 0, I) per example [B]."""
    flat = x.flatten(1)
    return -0.5 * (flat.pow(2).sum(1) + flat.shape[1] * math.log(2 * math.pi))


def ode_log_prob(velocity: Velocity, x: Tensor, *, probes: Tensor | None = None, method: str = "adaptive",
                 steps: int = 100, rtol: float = 1e-5, atol: float = 1e-5) -> Tensor:
    """log p_1(x) per example [B] of the model whose prior at t = 0 is N(0, I): the exact divergence
    when `probes` is None, else Hutchinson's with those probes ([k, *x.shape], fixed along the path)."""

    def field(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        xt = state[0]
        tt = t.to(xt.dtype).expand(xt.shape[0])
        if probes is None:
            v, div = exact_divergence(velocity, xt, tt)
        else:
            v, div = hutchinson_divergence(velocity, xt, tt, probes)
        return v, div.to(xt.dtype)

    delta = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    x0, delta = integrate(field, (x.detach(), delta), 1.0, 0.0, method=method, steps=steps, rtol=rtol, atol=atol)
    return standard_normal_log_prob(x0) + delta


def dequantize(x: Tensor, levels: int, u: Tensor) -> Tensor:
    """uint8 x holding `levels` grey levels and noise u in [0, 1) shaped like x -> y = c + w (u - 1/2), with
    c = images_to_unit(x) and w = 2/(levels-1)."""
    return images_to_unit(x, levels).to(u.dtype) + (u - 0.5) * (2.0 / (levels - 1))


def example_noise(indices: Tensor, shape: tuple[int, ...], seed: int, num_probes: int = 0,
                  probe: str = "rademacher") -> tuple[Tensor, Tensor | None]:
    """Dequantization noise u [B, *shape] and Hutchinson probes [num_probes, B, *shape] (None for 0) of the
    examples with these global indices, each from its own generator seeded by (seed, index): the same
    numbers whatever the batch or the rank that solves the example."""
    us, zs = [], []
    for i in indices.tolist():
        gen = torch.Generator().manual_seed((seed << 32) + int(i))
        us.append(torch.rand(shape, generator=gen))
        if num_probes:
            zs.append(draw_probes(us[-1], num_probes, probe, gen))
    return torch.stack(us), (torch.stack(zs, dim=1) if num_probes else None)


def ode_nll(velocity: Velocity, x: Tensor, levels: int, u: Tensor, *, probes: Tensor | None = None,
            method: str = "adaptive", steps: int = 100, rtol: float = 1e-5, atol: float = 1e-5,
            dtype: torch.dtype = torch.float32) -> Tensor:
    """Upper bound (in expectation over the dequantization noise u ~ U[0, 1)) on -log P(x) of discrete data
    x, per example [B] in nats: -log p_1(y) - D log(2/(levels-1)) with y = dequantize(x, levels, u) (module
    docstring); the exact divergence when `probes` is None, else Hutchinson's with those probes."""
    y = dequantize(x, levels, u).to(dtype)
    probes = None if probes is None else probes.to(y)
    log_p = ode_log_prob(velocity, y, probes=probes, method=method, steps=steps, rtol=rtol, atol=atol)
    # The grid's `levels` bins of width 2/(levels-1) tile a box of side 2 levels/(levels-1).
    return discrete_nll_from_density(-log_p.double(), y[0].numel(), levels, data_range=2 * levels / (levels - 1))
