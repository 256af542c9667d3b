"""Flow matching's path and loss (scalegen/objectives/flow_matching.py) against independent computations:
autograd for the path's time derivative, and the closed-form marginal velocity of a Gaussian target.

For data x1 ~ N(mu, s^2) (per dimension) and prior x0 ~ N(0, 1), x_t = t x1 + (1 - c t) x0 with
c = 1 - sigma_min is Gaussian with mean t mu and variance t^2 s^2 + (1 - c t)^2, jointly Gaussian with
u_t = x1 - c x0, so the marginal velocity E[u_t | x_t = x] is linear in x:

    v(x, t) = mu + b(t) (x - t mu),   b(t) = (t s^2 - c (1 - c t)) / (t^2 s^2 + (1 - c t)^2),

and in one dimension its flow is the monotone map of N(0, 1) onto N(t mu, var_t):
psi_t(x0) = t mu + sqrt(var_t) x0, so psi_1(x0) = mu + sqrt(s^2 + sigma_min^2) x0.
"""

from __future__ import annotations

import math

import pytest
import torch

from scalegen.objectives.flow_matching import flow_matching_loss, ot_path, ot_velocity, sample_times
from scalegen.samplers.ode import integrate

MU, S = 0.4, 0.3


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, mu: float = MU, s: float = S,
                      sigma_min: float = 0.0) -> torch.Tensor:
    """The closed-form marginal velocity above; t [B] or 0-dim, broadcast over x's trailing dimensions."""
    c = 1 - sigma_min
    t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) if t.dim() else t.to(x.dtype)
    b = (t * s**2 - c * (1 - c * t)) / (t**2 * s**2 + (1 - c * t) ** 2)
    return mu + b * (x - t * mu)


@pytest.mark.parametrize("sigma_min", [0.0, 1e-2, 0.3])
def test_path_endpoints_and_time_derivative_is_the_target(sigma_min: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    x1 = torch.rand(5, 2, 3, 3, generator=gen, dtype=torch.float64) * 2 - 1
    zeros, ones = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    torch.testing.assert_close(ot_path(x0, x1, zeros, sigma_min), x0)  # t = 0: the prior draw
    torch.testing.assert_close(ot_path(x0, x1, ones, sigma_min), x1 + sigma_min * x0)  # t = 1: N(x1, sigma_min^2)
    # d x_t / dt by forward-mode autograd (each example's x_t depends on its own t only) equals u_t.
    t = torch.rand(5, generator=gen, dtype=torch.float64)
    _, dxdt = torch.func.jvp(lambda t: ot_path(x0, x1, t, sigma_min), (t,), (ones,))
    torch.testing.assert_close(dxdt, ot_velocity(x0, x1, sigma_min))


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
@pytest.mark.parametrize("t_value", [0.1, 0.5, 0.9])
def test_loss_minimizer_over_linear_fields_is_the_marginal_velocity(t_value: float, sigma_min: float) -> None:
    """At a fixed t, the loss minimized over v(x) = a + b x (L-BFGS on the loss itself, one fixed
    sample of n pairs) recovers the closed-form field's intercept and slope within 5 standard errors
    of least-squares coefficients."""
    n = 200_000
    gen = torch.Generator().manual_seed(1)
    x1 = MU + S * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    x0 = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    t = torch.full((n,), t_value, dtype=torch.float64)
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    net = lambda x, t, y: params[0] + params[1] * x
    opt = torch.optim.LBFGS([params], lr=1, max_iter=100, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = flow_matching_loss(net, x1, x0, t, sigma_min=sigma_min).mean()
        loss.backward()
        return loss

    opt.step(closure)
    a, b = params.detach().tolist()
    c = 1 - sigma_min
    var_x = t_value**2 * S**2 + (1 - c * t_value) ** 2
    b_star = (t_value * S**2 - c * (1 - c * t_value)) / var_x
    a_star = MU - b_star * t_value * MU
    # Residual variance of u_t given x_t, and the usual least-squares standard errors.
    resid = S**2 + c**2 - (t_value * S**2 - c * (1 - c * t_value)) ** 2 / var_x
    mean_x = t_value * MU
    se_b = math.sqrt(resid / (n * var_x))
    se_a = math.sqrt(resid / n * (1 + mean_x**2 / var_x))
    assert abs(b - b_star) < 5 * se_b, (b, b_star, se_b)
    assert abs(a - a_star) < 5 * se_a, (a, a_star, se_a)
    # The closed form itself attains the minimum: E[(v - u)^2] = the residual variance.
    loss_star = flow_matching_loss(lambda x, t, y: gaussian_velocity(x, t, sigma_min=sigma_min), x1, x0, t,
                                   sigma_min=sigma_min).mean().item()
    assert loss_star == pytest.approx(resid, rel=5 * math.sqrt(2 / n))


@pytest.mark.parametrize("sigma_min", [0.0, 0.05])
@pytest.mark.parametrize("method,steps,atol", [("euler", 200, 2e-2), ("heun", 50, 1e-3), ("adaptive", 0, 1e-6)])
def test_integrating_the_closed_form_field_maps_the_prior_onto_the_target(method: str, steps: int, atol: float,
                                                                          sigma_min: float) -> None:
    """Each solver of scalegen.samplers.ode, integrating the Gaussian field from t = 0 to 1, sends x0 to
    psi_1(x0) = mu + sqrt(s^2 + sigma_min^2) x0 (up to its discretization error: `atol`), so the samples
    have the target's mean and standard deviation (5 standard errors + `atol`)."""
    n = 20_000
    x0 = torch.randn(n, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = integrate(lambda t, x: gaussian_velocity(x, t, sigma_min=sigma_min), x0, 0.0, 1.0, method=method,
                    steps=max(steps, 1), rtol=1e-8, atol=1e-8)
    scale = math.sqrt(S**2 + sigma_min**2)
    assert (out - (MU + scale * x0)).abs().max().item() < atol
    assert abs(out.mean().item() - MU) < 5 * scale / math.sqrt(n) + atol
    assert abs(out.std().item() - scale) < 5 * scale / math.sqrt(2 * n) + atol


def test_euler_is_first_order_and_heun_second_order_on_the_closed_form_field() -> None:
    """Doubling the steps halves Euler's error at t = 1 and quarters Heun's (ratios within 15%)."""
    x0 = torch.randn(2000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = MU + S * x0
    for method, order in (("euler", 1), ("heun", 2)):
        errors = [(integrate(lambda t, x: gaussian_velocity(x, t), x0, 0.0, 1.0, method=method, steps=k)
                   - exact).abs().max().item() for k in (25, 50, 100)]
        for coarse, fine in zip(errors, errors[1:]):
            assert coarse / fine == pytest.approx(2**order, rel=0.15), (method, errors)


def test_time_samplings() -> None:
    """uniform: mean 1/2, variance 1/12; logit_normal: logit(t) ~ N(0, 1) (moments within 5 s.e.)."""
    torch.manual_seed(3)
    n = 100_000
    u = sample_times(n, "uniform").double()
    assert ((u >= 0) & (u <= 1)).all()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)  # Var of (u - 1/2)^2 = 1/80 - 1/144
    z = torch.logit(sample_times(n, "logit_normal").double())
    assert abs(z.mean().item()) < 5 / math.sqrt(n) and abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    with pytest.raises(ValueError, match="time sampling 'beta'"):
        sample_times(3, "beta")
