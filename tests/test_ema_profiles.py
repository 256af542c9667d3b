"""Power-function EMA profiles (EDM2 sec. 3, app. C) against independent computations: numerical quadrature
of the profiles, the recursion run on unit vectors, and EDM2's published exponents."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad

from scalegen.ema_profiles import (
    MAX_SIGMA_REL,
    discrete_weights,
    gamma_to_sigma_rel,
    power_beta,
    profile_inner,
    sigma_rel_to_gamma,
    solve_weights,
)


def profile(t: float, gamma: float):
    return lambda tau: (gamma + 1) * tau**gamma / t ** (gamma + 1) if 0 <= tau <= t else 0.0


def test_edm2_exponents_and_the_uniform_limit():
    # EDM2 sec. 3.1: sigma_rel 0.05 and 0.10 are gamma = 16.97 and 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert sigma_rel_to_gamma(MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-9)  # the uniform average
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError):
            sigma_rel_to_gamma(bad)


@settings(deadline=None, max_examples=40)
@given(sigma=st.floats(0.005, MAX_SIGMA_REL - 1e-6))
def test_sigma_rel_is_the_std_of_the_profile(sigma):
    gamma = sigma_rel_to_gamma(sigma)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma, rel=1e-9)
    p = profile(1.0, gamma)
    mass = quad(p, 0, 1, limit=200)[0]
    mean = quad(lambda x: x * p(x), 0, 1, limit=200)[0]
    second = quad(lambda x: x * x * p(x), 0, 1, limit=200)[0]
    assert mass == pytest.approx(1.0, rel=1e-7)
    assert math.sqrt(second - mean**2) == pytest.approx(sigma, rel=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 1.5, 6.94, 16.97])
def test_the_recursion_weights_each_step_by_the_profile_integral(gamma):
    t = 37
    # Run ema_s = beta_s ema_{s-1} + (1 - beta_s) theta_s with theta_s = the s-th unit vector.
    ema = np.zeros(t)
    for s in range(1, t + 1):
        theta = np.eye(t)[s - 1]
        ema = power_beta(s, gamma) * ema + (1 - power_beta(s, gamma)) * theta
    np.testing.assert_allclose(ema, discrete_weights(t, gamma), rtol=1e-12, atol=1e-15)
    p = profile(t, gamma)
    integrals = [quad(p, i - 1, i)[0] for i in range(1, t + 1)]
    np.testing.assert_allclose(discrete_weights(t, gamma), integrals, rtol=1e-7, atol=1e-14)
    assert power_beta(1, gamma) == 0.0
    assert discrete_weights(5, gamma, length=8)[5:].tolist() == [0.0, 0.0, 0.0]


@settings(deadline=None, max_examples=20)
@given(gaps=st.lists(st.integers(1, 5), min_size=1, max_size=12), gamma=st.floats(0.0, 20.0))
def test_updates_at_irregular_steps_weight_each_by_the_profile_integral(gaps, gamma):
    times = np.cumsum(gaps)  # update after steps t_1 < t_2 < ... (every-k updates, steps that jump)
    ema, last = np.zeros(len(times)), 0
    for j, t in enumerate(times):
        beta = power_beta(int(t), gamma, int(t - last))
        ema = beta * ema + (1 - beta) * np.eye(len(times))[j]
        last = t
    t_end, prev = float(times[-1]), np.concatenate([[0.0], times[:-1]])
    expected = (times ** (gamma + 1) - prev ** (gamma + 1)) / t_end ** (gamma + 1)
    np.testing.assert_allclose(ema, expected, rtol=1e-9, atol=1e-12)


@settings(deadline=None, max_examples=40)
@given(
    t_a=st.floats(1.0, 500.0), t_b=st.floats(1.0, 500.0), g_a=st.floats(0.0, 30.0), g_b=st.floats(0.0, 30.0)
)
def test_inner_product_closed_form_matches_quadrature(t_a, t_b, g_a, g_b):
    pa, pb = profile(t_a, g_a), profile(t_b, g_b)
    numeric = quad(lambda x: pa(x) * pb(x), 0, min(t_a, t_b), limit=400, epsabs=0, epsrel=1e-10)[0]
    closed = float(profile_inner(t_a, g_a, t_b, g_b))
    assert closed == pytest.approx(numeric, rel=1e-6)
    assert closed == pytest.approx(float(profile_inner(t_b, g_b, t_a, g_a)), rel=1e-12)  # symmetric


def snapshots(n: int = 10, every: int = 10):
    steps = [every * (k + 1) for k in range(n)] * 2
    gammas = [sigma_rel_to_gamma(0.05)] * n + [sigma_rel_to_gamma(0.10)] * n
    return steps, gammas


def test_a_snapshot_is_reconstructed_by_itself():
    steps, gammas = snapshots()
    x, err = solve_weights(steps, gammas, 100, sigma_rel_to_gamma(0.10))
    expected = np.zeros(len(steps))
    expected[-1] = 1.0
    np.testing.assert_allclose(x, expected, atol=1e-6)
    assert err < 1e-4


@pytest.mark.parametrize("sigma", [0.03, 0.07, 0.15])
def test_reconstruction_error_and_optimality_by_quadrature(sigma):
    steps, gammas = snapshots()
    target = sigma_rel_to_gamma(sigma)
    x, err = solve_weights(steps, gammas, 100, target)
    assert x.sum() == pytest.approx(1.0, abs=1e-12)  # an affine combination: weights are never rescaled
    profiles = [profile(t, g) for t, g in zip(steps, gammas)]
    p = profile(100, target)

    def residual(coef):
        r = lambda tau: sum(c * q(tau) for c, q in zip(coef, profiles)) - p(tau)  # noqa: E731
        points = sorted(set(steps))
        return math.sqrt(quad(lambda tau: r(tau) ** 2, 0, 100, points=points, limit=400)[0])

    norm = math.sqrt(quad(lambda tau: p(tau) ** 2, 0, 100, limit=400)[0])
    assert err == pytest.approx(residual(x) / norm, rel=1e-4, abs=1e-7)
    # Least squares: no other affine combination fits better (random directions with zero sum).
    rng = np.random.default_rng(0)
    for _ in range(3):
        d = rng.normal(size=len(x))
        d -= d.mean()
        assert residual(x + 1e-2 * d / np.linalg.norm(d)) > residual(x)
    # The step-by-step weights of the reconstruction match the target's to the stated L1 error.
    rec = sum(c * discrete_weights(t, g, 100) for c, t, g in zip(x, steps, gammas))
    assert np.abs(rec - discrete_weights(100, target)).sum() < {0.03: 0.1, 0.07: 0.01, 0.15: 0.03}[sigma]


def test_more_snapshots_represent_more_profiles():
    narrow = sigma_rel_to_gamma(0.02)
    few = solve_weights(*snapshots(10, 10), 100, narrow)[1]
    many = solve_weights(*snapshots(20, 5), 100, narrow)[1]
    assert many < 0.5 * few and few > 0.1  # 10 snapshots cannot make sigma_rel 0.02 (error ~20%), 20 can (~9%)
