"""Posterior families: log q(z|x) of each against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from scalegen.nets.made import MADE
from scalegen.objectives import posteriors

D = 4


def _params(kind: str, b: int, steps: int, context: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(b, posteriors.param_dim(kind, D, steps, context), generator=g, dtype=torch.float64)


def test_diagonal_is_the_product_of_normals() -> None:
    g = torch.Generator().manual_seed(0)
    p = _params("diagonal", 5, 0, 0, g)
    z, log_q = posteriors.sample("diagonal", p, 7, D)
    ref = torch.distributions.Normal(p[:, :D], (0.5 * p[:, D:]).exp()).log_prob(z).sum(-1)
    torch.testing.assert_close(log_q, ref)


def test_full_covariance_matches_multivariate_normal() -> None:
    g = torch.Generator().manual_seed(1)
    p = _params("full", 5, 0, 0, g)
    torch.manual_seed(0)
    z, log_q = posteriors.sample("full", p, 7, D)
    # L built element by element, independently of scale_tril's indexing.
    L = torch.zeros(5, D, D, dtype=p.dtype)
    off = iter(range(2 * D, p.shape[1]))
    for i in range(D):
        L[:, i, i] = (0.5 * p[:, D + i]).exp()
    for i in range(D):
        for j in range(i):
            L[:, i, j] = p[:, next(off)] * (0.5 * p[:, D + j]).exp()  # (I + A) diag(sigma)
    ref = torch.distributions.MultivariateNormal(p[:, :D], scale_tril=L).log_prob(z)
    torch.testing.assert_close(log_q, ref)
    # The samples have covariance L L^T (a Monte-Carlo check of the sampler, not only of the density).
    z, _ = posteriors.sample("full", p[:1].expand(100_000, -1), 1, D)
    cov = torch.cov(z[0].T)
    torch.testing.assert_close(cov, L[0] @ L[0].T, atol=0.05 * (L[0] @ L[0].T).abs().max().item(), rtol=0)


def _made_steps(steps: int, context: int) -> torch.nn.ModuleList:
    torch.manual_seed(3)
    nets = torch.nn.ModuleList([MADE(D, 16, context) for _ in range(steps)]).double()
    with torch.no_grad():  # far from the near-identity initialization: a flow that really bends
        for net in nets:
            net.out.weight.normal_(0, 0.5)
            net.out.bias.normal_(0, 1.0)
    return nets


@pytest.mark.parametrize("kind", ["planar", "iaf"])
def test_flow_density_is_the_change_of_variables_with_an_autograd_jacobian(kind: str) -> None:
    steps, context = 3, 5
    g = torch.Generator().manual_seed(2)
    p = _params(kind, 4, steps, context if kind == "iaf" else 0, g)
    if kind == "planar":  # u anti-aligned with w in one step: the invertibility fix u -> u' must act
        w = p[:, 2 * D + D:2 * D + 2 * D]
        p[:, 2 * D:3 * D] = -3 * w
    nets = _made_steps(steps, context) if kind == "iaf" else ()
    torch.manual_seed(0)
    z, log_q = posteriors.sample(kind, p, 2, D, nets)
    # Recover the noise of each sample by re-running with the seed, then differentiate eps -> z.
    torch.manual_seed(0)
    eps = torch.randn(2, 4, D, dtype=p.dtype)
    for s in range(2):
        for b in range(4):
            f = lambda e, b=b: posteriors.transform(kind, p[b:b + 1], e.view(1, 1, D), nets)[0].view(D)  # noqa: E731
            torch.testing.assert_close(f(eps[s, b]), z[s, b])
            J = jacobian(f, eps[s, b])
            log_q0 = -0.5 * (D * math.log(2 * math.pi) + (eps[s, b] ** 2).sum())
            ref = log_q0 - torch.linalg.slogdet(J)[1]
            assert torch.linalg.det(J) > 0  # each step is orientation-preserving (invertible)
            torch.testing.assert_close(log_q[s, b], ref)


def test_iaf_step_is_autoregressive() -> None:
    """MADE's output i depends on z_<i only, so each IAF step's Jacobian in z is lower triangular."""
    net = _made_steps(1, 3)[0]
    h = torch.randn(3, dtype=torch.float64)
    J = jacobian(lambda z: torch.cat(net(z, h)), torch.randn(D, dtype=torch.float64))
    for part in (J[:D], J[D:]):
        assert torch.all(part.triu() == 0)
    assert (J[D:].tril(-1).abs() > 0).any()  # and really depends on the earlier coordinates


def test_full_covariance_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(5)
    p = _params("full", 6, 0, 0, g)
    pmu, plogvar = torch.randn(6, D, generator=g, dtype=p.dtype), torch.randn(6, D, generator=g, dtype=p.dtype)
    q = torch.distributions.MultivariateNormal(p[:, :D], scale_tril=posteriors.scale_tril(p[:, D:2 * D], p[:, 2 * D:]))
    prior = torch.distributions.MultivariateNormal(pmu, covariance_matrix=torch.diag_embed(plogvar.exp()))
    kl = torch.distributions.kl_divergence(q, prior)
    torch.testing.assert_close(posteriors.full_gaussian_kl(p, pmu, plogvar), kl)
    std = torch.distributions.MultivariateNormal(torch.zeros(D, dtype=p.dtype), torch.eye(D, dtype=p.dtype))
    torch.testing.assert_close(posteriors.full_gaussian_kl(p), torch.distributions.kl_divergence(q, std))
