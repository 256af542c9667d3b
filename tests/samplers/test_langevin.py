"""Langevin samplers against closed forms: the mean and covariance of a known 2-D Gaussian mixture
(Monte-Carlo tolerances in standard errors of the chains' final states), and the deterministic limit."""

from __future__ import annotations

import math

import pytest
import torch

from scalegen.samplers.langevin import annealed_langevin, clip_rows, energy_grad, geometric_sigmas, sgld

WEIGHTS = torch.tensor([0.4, 0.6], dtype=torch.float64)
MEANS = torch.tensor([[-1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
COVS = torch.tensor([[[0.5, 0.2], [0.2, 0.4]], [[0.3, -0.1], [-0.1, 0.6]]], dtype=torch.float64)


def mixture_log_density(x: torch.Tensor, extra_var: float = 0.0) -> torch.Tensor:
    """log sum_k pi_k N(x; mu_k, Sigma_k + extra_var I): the mixture, or the mixture noised by N(0, extra_var I)."""
    covs = COVS + extra_var * torch.eye(2, dtype=torch.float64)
    comps = torch.distributions.MultivariateNormal(MEANS.to(x.dtype), covs.to(x.dtype))
    return torch.logsumexp(comps.log_prob(x.unsqueeze(1)) + WEIGHTS.log().to(x.dtype), dim=1)


def mixture_moments() -> tuple[torch.Tensor, torch.Tensor]:
    mean = (WEIGHTS[:, None] * MEANS).sum(0)
    second = (WEIGHTS[:, None, None] * (COVS + MEANS[:, :, None] * MEANS[:, None, :])).sum(0)
    return mean, second - torch.outer(mean, mean)


def assert_moments(x: torch.Tensor, bias: float) -> None:
    """Sample mean and covariance within 4 standard errors (+ `bias`, the sampler's discretization
    allowance) of the mixture's exact moments."""
    n = len(x)
    mean, cov = mixture_moments()
    m = x.mean(0)
    se_mean = (x.var(0) / n).sqrt()
    assert ((m - mean).abs() <= 4 * se_mean + bias).all(), (m, mean, se_mean)
    c = x - m
    prods = c[:, :, None] * c[:, None, :]
    se_cov = prods.std(0) / math.sqrt(n)
    assert ((prods.mean(0) - cov).abs() <= 4 * se_cov + bias).all(), (prods.mean(0), cov, se_cov)


def test_sgld_chains_reproduce_mixture_mean_and_covariance() -> None:
    g = torch.Generator().manual_seed(0)
    x0 = 2 * torch.randn(4000, 2, generator=g, dtype=torch.float64)
    # sigma = sqrt(a): unadjusted Langevin, whose stationary law is within O(a) of exp(-E).
    x = sgld(lambda v: -mixture_log_density(v), x0, steps=1500, step_size=0.01, generator=g)
    assert_moments(x, bias=0.01)


def test_annealed_langevin_with_the_analytic_score_reproduces_the_mixture() -> None:
    g = torch.Generator().manual_seed(1)
    sigmas = geometric_sigmas(2.0, 0.01, 10)

    def score(v: torch.Tensor, i: int) -> torch.Tensor:  # grad log of the mixture noised to sigma_i
        return -energy_grad(lambda u: -mixture_log_density(u, float(sigmas[i]) ** 2), v)

    x0 = 3 * torch.randn(4000, 2, generator=g, dtype=torch.float64)
    x = annealed_langevin(score, x0, sigmas, steps_per_level=100, eps=1e-4, generator=g)
    assert_moments(x, bias=0.01)


def test_sgld_without_noise_is_gradient_descent_in_closed_form() -> None:
    c = torch.tensor([[0.5, -2.0]])
    x0 = torch.tensor([[3.0, 1.0]])
    a, k = 0.1, 20
    x = sgld(lambda v: 0.5 * ((v - c) ** 2).sum(1), x0, steps=k, step_size=a, noise_scale=0.0)
    torch.testing.assert_close(x, c + (1 - a / 2) ** k * (x0 - c))


def test_gradient_clipping_and_clamp() -> None:
    g = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    torch.testing.assert_close(clip_rows(g, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    # A steep linear energy pushes every chain past the box; clamp keeps them on its edge.
    x = sgld(lambda v: -100 * v.sum(1), torch.zeros(8, 3), steps=5, step_size=1.0, noise_scale=0.0, clamp=(-1, 1))
    assert torch.equal(x, torch.ones(8, 3))
    # With clipping each step moves by at most a/2 * grad_clip.
    x = sgld(lambda v: -100 * v.sum(1), torch.zeros(2, 3), steps=1, step_size=1.0, noise_scale=0.0, grad_clip=1.0)
    assert x.norm(dim=1).max().item() == pytest.approx(0.5)


def test_negatives_carry_no_graph_to_parameters() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    x = sgld(lambda v: (v * w).sum(1) ** 2, torch.randn(4, 2), steps=3, step_size=0.1)
    assert not x.requires_grad and w.grad is None


def test_geometric_ladder() -> None:
    s = geometric_sigmas(1.0, 0.01, 5)
    torch.testing.assert_close(s, torch.tensor([1.0, 10**-0.5, 0.1, 10**-1.5, 0.01]))
