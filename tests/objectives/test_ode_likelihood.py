"""ODE likelihoods (scalegen.objectives.ode_likelihood) against closed forms.

The model: the optimal-transport path from N(0, I) at t = 0 to N(mu, diag s^2) at t = 1, x_t = t x1 + (1-t) x0.
Its marginal is Gaussian with mean t mu and variance v_t = (1-t)^2 + t^2 s^2 per dimension, and the velocity
that moves it is linear in x: u(x, t) = mu + (t s^2 - (1-t)) / v_t (x - t mu) (the time derivative of the
standardizing map). So the ODE's log p_1 must be log N(x; mu, s^2) exactly, and its divergence is
sum_i (t s_i^2 - (1-t)) / v_t,i.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from scalegen.objectives.ode_likelihood import (
    dequantize,
    draw_probes,
    exact_divergence,
    hutchinson_divergence,
    ode_log_prob,
    ode_nll,
)

DT = torch.float64


class GaussianPath(nn.Module):
    """The OT path's velocity field to N(mu, diag s^2), for x of any shape [B, ...] (mu, s shaped like one x)."""

    def __init__(self, mu: Tensor, s: Tensor) -> None:
        super().__init__()
        self.mu, self.s = mu, s

    def variance(self, t: Tensor, like: Tensor) -> Tensor:
        t = t.reshape(-1, *([1] * (like.dim() - 1)))
        return (1 - t) ** 2 + t**2 * self.s**2, t

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        v, t = self.variance(t, x)
        return self.mu + (t * self.s**2 - (1 - t)) / v * (x - t * self.mu)

    def log_prob(self, x: Tensor) -> Tensor:
        return torch.distributions.Normal(self.mu, self.s).log_prob(x).flatten(1).sum(1)


def gaussian_path(shape=(2,)) -> GaussianPath:
    g = torch.Generator().manual_seed(0)
    return GaussianPath(torch.randn(shape, generator=g, dtype=DT) * 0.5,
                        torch.rand(shape, generator=g, dtype=DT) * 0.5 + 0.2)


class TanhField(nn.Module):
    """A nonlinear field with a dense, non-symmetric Jacobian: tanh(W x + t b) + A x."""

    def __init__(self, d: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = torch.randn(d, d, generator=g, dtype=DT)
        self.a = torch.randn(d, d, generator=g, dtype=DT)
        self.b = torch.randn(d, generator=g, dtype=DT)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(x @ self.w.T + t[:, None] * self.b) + x @ self.a.T


def test_ode_log_prob_of_the_gaussian_path_is_the_gaussian_density() -> None:
    field = gaussian_path((2,))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    got = ode_log_prob(field, x, method="adaptive", rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, field.log_prob(x), rtol=0, atol=1e-6)
    # Image-shaped states work the same way, and Heun's fixed-step solution converges to the same value at
    # second order (halving the step divides the error by about 4).
    field4 = gaussian_path((1, 2, 2))
    x4 = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    torch.testing.assert_close(ode_log_prob(field4, x4, rtol=1e-9, atol=1e-9), field4.log_prob(x4), rtol=0, atol=1e-6)
    errors = [float((ode_log_prob(field4, x4, method="heun", steps=n) - field4.log_prob(x4)).abs().max())
              for n in (100, 200)]
    assert errors[1] < 0.01 and 3 < errors[0] / errors[1] < 5, errors


def test_ode_log_prob_with_hutchinson_probes_is_exact_for_a_diagonal_jacobian() -> None:
    # For a diagonal Jacobian z^T J z = sum_i J_ii z_i^2 = the trace for every Rademacher probe.
    field = gaussian_path((3,))
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(4), dtype=DT)
    probes = draw_probes(x, 2, "rademacher", torch.Generator().manual_seed(5))
    got = ode_log_prob(field, x, probes=probes, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, field.log_prob(x), rtol=0, atol=1e-6)


def test_exact_divergence_is_the_trace_of_the_autograd_jacobian_even_under_no_grad() -> None:
    field = TanhField(5)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(6), dtype=DT)
    t = torch.rand(7, dtype=DT)
    with torch.no_grad():
        v, div = exact_divergence(field, x, t)
    want = torch.stack([torch.autograd.functional.jacobian(lambda xi, ti=ti: field(xi[None], ti[None])[0], xi).trace()
                        for xi, ti in zip(x, t)])
    torch.testing.assert_close(div, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, field(x, t))
    assert not v.requires_grad and not div.requires_grad


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_estimate_averages_to_the_exact_divergence(kind: str) -> None:
    """n one-probe estimates at one point: the mean is within 4 standard errors of the trace, and the spread is
    the estimator's known variance, Var = 2 (||J_s||_F^2 - sum_i J_ii^2) for Rademacher probes and 2 ||J_s||_F^2
    for Gaussian ones (J_s the symmetric part of the Jacobian)."""
    d, n = 5, 20000
    field = TanhField(d)
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(7), dtype=DT).expand(n, d)
    t = torch.full((n,), 0.3, dtype=DT)
    probes = draw_probes(x, 1, kind, torch.Generator().manual_seed(8))  # one probe per row: n independent ones
    _, est = hutchinson_divergence(field, x, t, probes)
    jac = torch.autograd.functional.jacobian(lambda xi: field(xi[None], t[:1])[0], x[0])
    sym = 0.5 * (jac + jac.T)
    var = 2 * (sym.pow(2).sum() - (jac.diag().pow(2).sum() if kind == "rademacher" else 0))
    sem = est.std() / math.sqrt(n)
    assert abs(float(est.mean() - jac.trace())) < 4 * float(sem)
    assert float(est.var()) == pytest.approx(float(var), rel=0.06)  # ~ 4 s.e. of a variance at n = 20000
    if kind == "rademacher":
        assert set(probes.unique().tolist()) == {-1.0, 1.0}


def test_dequantized_bound_matches_its_expectation_and_bounds_the_discrete_nll() -> None:
    """A model with density N(mu, diag s^2) on [-1, 1]-scaled data with L levels. Its dequantized bound
    -log p(c + w(u - 1/2)) - D log w has the expectation sum_i [log(2 pi s_i^2)/2 + ((c_i - mu_i)^2 + w^2/12)
    / (2 s_i^2)] - D log w, which is at least the exact discrete NLL -sum_i log(Phi(b_i) - Phi(a_i)) of the bins."""
    levels, n = 8, 4000
    field = gaussian_path((1, 1, 2))
    w = 2 / (levels - 1)
    k = torch.tensor([[2, 5]])  # grid indices -> uint8 values k * 255 / (levels - 1)
    x = (k * 255 / (levels - 1)).round().to(torch.uint8).reshape(1, 1, 1, 2).expand(n, 1, 1, 2)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(9), dtype=DT)
    got = ode_nll(field, x, levels, u, rtol=1e-8, atol=1e-8, dtype=DT)
    c = (k * w - 1).to(DT).reshape(1, 1, 2)
    mu, s = field.mu, field.s
    expected = float((0.5 * torch.log(2 * math.pi * s**2) + ((c - mu) ** 2 + w**2 / 12) / (2 * s**2)).sum()
                     - 2 * math.log(w))
    normal = torch.distributions.Normal(mu, s)
    exact = float(-torch.log(normal.cdf(c + w / 2) - normal.cdf(c - w / 2)).sum())
    sem = float(got.std() / math.sqrt(n))
    assert abs(float(got.mean()) - expected) < 4 * sem
    assert expected >= exact
    # The noise stays inside each value's bin, centred on the grid point.
    y = dequantize(x, levels, u)
    assert ((y - c).abs() <= w / 2).all() and abs(float((y - c).mean())) < 0.01
