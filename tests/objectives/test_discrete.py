"""Discrete-latent gradient estimators against the exact gradient of a model small enough to enumerate.

The model: 4 binary observations of 6 pixels, a Bernoulli latent of 3 bits (8 configurations) or a
categorical latent of 2 variables with 3 classes (9 configurations), a fixed linear decoder, a uniform
prior and free encoder logits theta per observation. The exact ELBO sums q(z|x) f(z) over every z."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from scalegen.nets.mlp import MLP
from scalegen.objectives import discrete
from scalegen.objectives.elbo import bernoulli_log_prob

N = 20_000  # samples per estimate


class Toy:
    def __init__(self, latent: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.latent = latent
        self.x = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 0, 1], [1, 0, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0]],
                              dtype=torch.float64)
        self.shape = (3,) if latent == "bernoulli" else (2, 3)
        width = math.prod(self.shape)
        self.W = torch.randn(6, width, generator=g, dtype=torch.float64) * 2
        self.b = torch.randn(6, generator=g, dtype=torch.float64)
        self.theta = torch.randn(4, *self.shape, generator=g, dtype=torch.float64)
        self.log_prior = discrete.uniform_log_prior(latent, self.shape[0], self.shape[-1])

    def log_px(self, z: torch.Tensor) -> torch.Tensor:
        logits = z.flatten(-len(self.shape)) @ self.W.T + self.b
        return bernoulli_log_prob(self.x.expand_as(logits).reshape(-1, 6), logits.reshape(-1, 6)).view(
            logits.shape[:-1])

    def configurations(self) -> torch.Tensor:
        if self.latent == "bernoulli":
            return torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=torch.float64)
        idx = torch.tensor(list(itertools.product(range(3), repeat=2)))
        return F.one_hot(idx, 3).double()

    def log_q(self, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if self.latent == "bernoulli":
            return discrete.bernoulli_log_q(z, theta)
        return discrete.categorical_log_q(z, theta)

    def exact_gradient(self) -> torch.Tensor:
        theta = self.theta.clone().requires_grad_()
        zs = self.configurations()[:, None]  # [C, 1, ...] against the 4 observations
        log_q = self.log_q(zs, theta)  # [C, 4]
        elbo = (log_q.exp() * (self.log_px(zs.expand(-1, 4, *self.shape)) + self.log_prior - log_q)).sum()
        return torch.autograd.grad(elbo, theta)[0]

    def score_gradients(self, signal_fn, n: int = N) -> torch.Tensor:
        """Per-sample score-function gradients [n, 4, ...]; signal_fn(f, theta_rows) -> learning signal."""
        theta = self.theta.expand(n, *self.theta.shape).clone().requires_grad_()
        z, log_q = discrete.sample_latent(theta, self.latent)
        f = self.log_px(z) + self.log_prior - log_q
        surrogate = discrete.score_function_surrogate(f, log_q, signal_fn(f))
        return torch.autograd.grad(surrogate.sum(), theta)[0]

    def relaxed_gradients(self, tau: float, hard: bool, n: int = N) -> torch.Tensor:
        theta = self.theta.expand(n, *self.theta.shape).clone().requires_grad_()
        relax = discrete.binary_concrete if self.latent == "bernoulli" else discrete.gumbel_softmax
        z = relax(theta, tau, hard)
        obj = self.log_px(z) - discrete.kl_to_uniform(theta, self.latent)
        return torch.autograd.grad(obj.sum(), theta)[0]


def _trained_baseline(toy: Toy) -> tuple[discrete.ControlVariates, MLP]:
    """NVIL's moving average and input-dependent baseline b(x), trained on the toy by regression."""
    torch.manual_seed(1)
    control = discrete.ControlVariates(decay=0.9, normalize=False).double()
    net = MLP(6, [32], 1).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(400):
        theta = toy.theta.expand(64, *toy.theta.shape)
        z, log_q = discrete.sample_latent(theta, toy.latent)
        f = (toy.log_px(z) + toy.log_prior - log_q).detach()
        b = net(toy.x).squeeze(-1)
        control(f, b.detach())
        loss = ((f - control.mean - b) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return control, net


def _total_variance(grads: torch.Tensor) -> float:
    return grads.flatten(1).var(0).sum().item()


def _assert_unbiased(grads: torch.Tensor, exact: torch.Tensor, name: str) -> None:
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    z = ((mean - exact) / se).abs().max().item()
    assert z < 4.5, f"{name}: max |mean - exact| / s.e. = {z:.2f}"


@pytest.mark.parametrize("latent", ["bernoulli", "categorical"])
def test_score_function_is_unbiased_and_control_variates_cut_its_variance(latent: str) -> None:
    toy = Toy(latent)
    exact = toy.exact_gradient()
    control, net = _trained_baseline(toy)
    torch.manual_seed(2)
    with torch.no_grad():
        b = net(toy.x).squeeze(-1)
    grads = {
        "reinforce": toy.score_gradients(lambda f: f),
        "moving_average": toy.score_gradients(lambda f: f - control.mean),
        "learned_baseline": toy.score_gradients(lambda f: control(f, b, update=False)),
    }
    for name, g in grads.items():
        _assert_unbiased(g, exact, name)
    var = {name: _total_variance(g) for name, g in grads.items()}
    print(f"\n{latent}: total gradient variance per sample", {k: f"{v:.3g}" for k, v in var.items()})
    assert var["reinforce"] / var["moving_average"] > 2.0, var
    assert var["moving_average"] / var["learned_baseline"] > 1.5, var


def test_variance_normalization_rescales_the_gradient_by_a_known_factor() -> None:
    toy = Toy("bernoulli")
    exact = toy.exact_gradient()
    control, net = _trained_baseline(toy)
    control.var.fill_(9.0)  # a learning signal of standard deviation 3: the gradient is divided by 3
    normalized = discrete.ControlVariates(normalize=True).double()
    normalized.load_state_dict(control.state_dict())
    with torch.no_grad():
        b = net(toy.x).squeeze(-1)
    torch.manual_seed(3)
    grads = toy.score_gradients(lambda f: normalized(f, b, update=False))
    # The score part is divided by 3; the direct part (d f / d theta, whose mean is 0) is not.
    torch.manual_seed(3)
    direct = toy.score_gradients(lambda f: torch.zeros_like(f))
    _assert_unbiased(3 * (grads - direct) + direct, exact, "normalized")


@pytest.mark.parametrize("latent", ["bernoulli", "categorical"])
def test_gumbel_softmax_gradient_bias_is_reported_and_small_at_low_temperature(latent: str) -> None:
    """Gumbel-softmax estimates the gradient of a relaxed objective: biased for the discrete ELBO, and
    far less noisy than the score function. The bias is printed (docs/families.md records it)."""
    toy = Toy(latent)
    exact = toy.exact_gradient()
    torch.manual_seed(4)
    reinforce_var = _total_variance(toy.score_gradients(lambda f: f))
    rows = {}
    for tau, hard in ((1.0, False), (0.5, False), (0.1, False), (1.0, True)):
        g = toy.relaxed_gradients(tau, hard)
        bias = ((g.mean(0) - exact).norm() / exact.norm()).item()
        se = (g.std(0) / math.sqrt(len(g))).norm().item() / exact.norm().item()
        rows[(tau, hard)] = (bias, se, _total_variance(g))
    print(f"\n{latent}: relative bias |E g - grad| / |grad| (s.e.), variance; reinforce variance "
          f"{reinforce_var:.3g}")
    for (tau, hard), (bias, se, var) in rows.items():
        print(f"  tau={tau} {'straight-through' if hard else 'relaxed'}: {bias:.3f} ({se:.3f}), {var:.3g}")
    bias, se, var = rows[(1.0, False)]
    assert bias > 5 * se  # biased at tau = 1, measurably beyond Monte-Carlo noise
    assert var < reinforce_var  # and lower variance than the plain score function
    assert rows[(0.1, False)][0] < rows[(1.0, False)][0] / 3  # the bias shrinks as tau -> 0
    assert all(math.isfinite(b) for b, _, _ in rows.values())


def test_kl_to_uniform_matches_enumeration() -> None:
    toy = Toy("categorical")
    zs = toy.configurations()[:, None]
    log_q = toy.log_q(zs, toy.theta)
    torch.testing.assert_close(discrete.kl_to_uniform(toy.theta, "categorical"),
                               (log_q.exp() * (log_q - toy.log_prior)).sum(0))
    toy = Toy("bernoulli")
    zs = toy.configurations()[:, None]
    log_q = toy.log_q(zs, toy.theta)
    torch.testing.assert_close(discrete.kl_to_uniform(toy.theta, "bernoulli"),
                               (log_q.exp() * (log_q - toy.log_prior)).sum(0))


def test_temperature_schedule() -> None:
    assert discrete.temperature(0, 1.0, 0.5, 1e-3) == 1.0
    assert discrete.temperature(100, 1.0, 0.5, 1e-3) == pytest.approx(math.exp(-0.1))
    assert discrete.temperature(10_000, 1.0, 0.5, 1e-3) == 0.5
