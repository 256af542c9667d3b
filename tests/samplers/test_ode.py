"""The shared ODE integrator against closed-form solutions."""

import math

import pytest
import torch

from scalegen.samplers.ode import integrate


def linear_field(t, x):
    return -2.0 * x  # x(t) = x0 exp(-2 t)


@pytest.mark.parametrize("method,steps,tol", [("euler", 1000, 5e-3), ("heun", 100, 2e-4), ("adaptive", 0, 1e-5)])
def test_linear_ode_matches_closed_form(method, steps, tol):
    x0 = torch.tensor([1.0, -3.0], dtype=torch.float64)
    x1 = integrate(linear_field, x0, 0.0, 1.0, method=method, steps=max(steps, 1), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(x1, x0 * math.exp(-2.0), rtol=tol, atol=0)


def test_heun_is_second_order():
    x0 = torch.ones(1, dtype=torch.float64)
    exact = math.exp(-2.0)
    errors = [abs(integrate(linear_field, x0, 0.0, 1.0, method="heun", steps=n).item() - exact) for n in (20, 40)]
    assert 3.5 < errors[0] / errors[1] < 4.5  # halving h quarters the error


def test_tuple_state_and_backwards_time():
    # d(x, s)/dt = (-x, x): s accumulates the integral of x; integrate from 1 back to 0.
    f = lambda t, st: (-st[0], st[0])
    x1 = torch.tensor([math.exp(-1.0)], dtype=torch.float64)
    x0, s = integrate(f, (x1, torch.zeros(1, dtype=torch.float64)), 1.0, 0.0, method="adaptive", rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0, torch.ones(1, dtype=torch.float64))
    # s(0) - s(1) = -int_0^1 x dt = -(1 - e^-1)
    torch.testing.assert_close(s, torch.tensor([-(1 - math.exp(-1.0))], dtype=torch.float64))


def test_unknown_method_refused():
    with pytest.raises(ValueError, match="one of euler, heun, adaptive"):
        integrate(linear_field, torch.ones(1), 0.0, 1.0, method="rk4")
