"""Inference gaps on a linear-Gaussian model, whose posterior and evidence are exact."""

from __future__ import annotations

import math

import pytest
import torch

from scalegen.eval.gaps import GapSettings, example_gaps, optimize_posterior, summarize, supports_gaps
from scalegen.objectives import posteriors

D, X = 3, 5


class LinearGaussian:
    """p(z) = N(0, I), p(x|z) = N(W z + b, s^2 I), with a deliberately poor linear "encoder"
    (mean A x, unit variances, no correlations) and a posterior family `kind` (diagonal or full)."""

    reparameterized_posterior = True

    def __init__(self, kind: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.kind = kind
        self.W = torch.randn(X, D, generator=g, dtype=torch.float64)
        self.b = torch.randn(X, generator=g, dtype=torch.float64)
        self.s2 = 0.5
        self.A = 0.3 * torch.randn(D, X, generator=g, dtype=torch.float64)

    def posterior_params(self, x: torch.Tensor, y=None) -> torch.Tensor:
        mu = x @ self.A.T
        return torch.cat([mu, torch.zeros(len(x), posteriors.param_dim(self.kind, D) - D, dtype=x.dtype)], 1)

    def log_weights(self, x, y, k: int, params: torch.Tensor) -> torch.Tensor:
        z, log_q = posteriors.sample(self.kind, params, k, D)
        mean = z @ self.W.T + self.b
        log_px = torch.distributions.Normal(mean, math.sqrt(self.s2)).log_prob(x).sum(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        return log_px + log_pz - log_q

    # Closed forms.
    def precision(self) -> torch.Tensor:
        return torch.eye(D, dtype=torch.float64) + self.W.T @ self.W / self.s2

    def exact_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cov = torch.linalg.inv(self.precision())
        return (x - self.b) @ self.W @ cov / self.s2, cov

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + self.s2 * torch.eye(X, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)


def _data(model: LinearGaussian, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, D, generator=g, dtype=torch.float64)
    return z @ model.W.T + model.b + math.sqrt(model.s2) * torch.randn(n, X, generator=g, dtype=torch.float64)


SETTINGS = GapSettings(iwae_k=2000, samples=4000, steps=600, lr=0.03, opt_samples=32, chunk=1000)


def test_full_covariance_gap_is_zero_and_the_optimization_finds_the_exact_posterior() -> None:
    torch.manual_seed(0)
    model = LinearGaussian("full")
    assert supports_gaps(model)
    x = _data(model, 8)
    rows = example_gaps(model, x, None, SETTINGS)
    exact = model.log_evidence(x)
    log_px, e_amortized, e_optimized = rows.unbind(1)
    torch.testing.assert_close(log_px, exact, atol=0.02, rtol=0)  # IWAE with q = the posterior is exact
    approximation = exact - e_optimized
    assert approximation.abs().max() < 0.05, approximation  # the family contains the posterior: gap ~ 0
    assert (e_optimized - e_amortized).min() > 0.5  # the poor encoder leaves a clear amortization gap
    # The optimized parameters are the exact posterior's mean and covariance.
    torch.manual_seed(1)
    p = optimize_posterior(model, x, None, model.posterior_params(x), SETTINGS)
    mu, cov = model.exact_posterior(x)
    torch.testing.assert_close(p[:, :D], mu, atol=0.05, rtol=0)
    L = posteriors.scale_tril(p[:, D:2 * D], p[:, 2 * D:])
    torch.testing.assert_close(L @ L.transpose(1, 2), cov.expand(8, D, D), atol=0.03, rtol=0)
    summary = summarize(rows, SETTINGS)
    assert summary["approximation_gap"]["mean"] == pytest.approx((log_px - e_optimized).mean().item())
    assert summary["amortization_gap"]["mean"] == pytest.approx((e_optimized - e_amortized).mean().item())
    assert summary["unit"] == "nats" and summary["count"] == 8


def test_diagonal_approximation_gap_equals_the_mean_field_closed_form() -> None:
    """The best diagonal Gaussian for a Gaussian posterior of precision P has precisions diag(P), and
    log p(x) - its ELBO = KL(q*||p) = (sum log P_ii - log det P) / 2, the same for every x."""
    torch.manual_seed(0)
    model = LinearGaussian("diagonal")
    x = _data(model, 8)
    rows = example_gaps(model, x, None, SETTINGS)
    P = model.precision()
    closed = 0.5 * (torch.log(torch.diagonal(P)).sum() - torch.logdet(P)).item()
    assert closed > 0.1  # the posterior is correlated: a real gap to find
    approximation = model.log_evidence(x) - rows[:, 2]
    torch.testing.assert_close(approximation, torch.full_like(approximation, closed), atol=0.05, rtol=0)
