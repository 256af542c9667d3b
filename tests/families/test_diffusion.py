"""Diffusion family: forward process, posterior, parameterizations, the variational bound, samplers.

Every check compares against an independent computation: the step-by-step Markov chain, Gaussian
conditioning, scipy's normal CDF, or the analytic denoiser of Gaussian data (for which the exact
E[eps | x_t] is known in closed form). Monte-Carlo tolerances are stated as multiples of the
standard error.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from image_data import Images
from scipy.stats import norm
from torch.utils.data import DataLoader

from scalegen.config.schema import OptimConfig
from scalegen.dataspec import DataSpec, images_to_unit, unit_to_images
from scalegen.families.diffusion import Diffusion, DiffusionConfig
from scalegen.nets.unet import UNet
from scalegen.objectives.diffusion import (
    NoiseSchedule,
    cosine_betas,
    discretized_gaussian_nll,
    linear_betas,
    predict_x0_eps,
    prior_kl,
    q_posterior,
    q_sample,
    v_target,
    vlb,
    vlb_term,
)
from scalegen.samplers.diffusion import ddim_sample, ddim_timesteps, ddpm_sample

# ---- schedules and the forward process ----------------------------------------------------------


def test_linear_and_cosine_schedules_match_their_definitions() -> None:
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    # Cosine: alpha-bar_t = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1+s)) pi/2), wherever no beta was clipped.
    T, s = 1000, 0.008
    ac = torch.cumprod(1 - cosine_betas(T), 0).numpy()
    t = np.arange(1, T + 1)
    f = lambda u: np.cos((u / T + s) / (1 + s) * np.pi / 2) ** 2
    np.testing.assert_allclose(ac[:990], (f(t) / f(0))[:990], rtol=1e-9)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_forward_noising_matches_closed_form(name: str) -> None:
    """Running the chain x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps step by step gives the mean
    and variance of q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, 1 - alpha-bar_t); so does q_sample."""
    T, n = 50, 40000
    schedule = NoiseSchedule.named(name, T)
    betas = schedule.array("betas").numpy()
    x0 = torch.tensor([-1.0, -0.3, 0.5, 1.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = x0.expand(n, -1).clone()
    for step in range(T):
        eps = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x = math.sqrt(1 - betas[step]) * x + math.sqrt(betas[step]) * eps  # q(x_t | x_{t-1}), eq. 2
        if step not in (0, 9, 24, 49):
            continue
        i = torch.full((n,), step)
        fresh = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        direct = q_sample(schedule, x0.expand(n, -1), i, fresh)
        ab = schedule.array("alphas_cumprod")[step].item()
        mean, var = math.sqrt(ab) * x0, 1 - ab
        for samples in (x, direct):
            se_mean = math.sqrt(var / n)
            se_var = var * math.sqrt(2 / (n - 1))
            assert (samples.mean(0) - mean).abs().max() < 5 * se_mean
            assert (samples.var(0) - var).abs().max() < 5 * se_var


def test_posterior_is_gaussian_conditioning() -> None:
    """q(x_{t-1} | x_t, x_0) equals the conditional of the joint Gaussian of (x_{t-1}, x_t) given x_0."""
    schedule = NoiseSchedule.named("linear", 200)
    ac = schedule.array("alphas_cumprod")
    i = torch.tensor([1, 10, 100, 199])
    x0 = torch.tensor([0.7, -0.2, 0.1, -1.0], dtype=torch.float64)
    xt = torch.tensor([0.3, 1.5, -2.0, 0.4], dtype=torch.float64)
    mean, logvar = q_posterior(schedule, x0, xt, i)
    a_prev, a_t = ac[i - 1], ac[i]
    alpha_t = a_t / a_prev
    cov = alpha_t.sqrt() * (1 - a_prev)  # Cov(x_{t-1}, x_t | x_0)
    expected_mean = a_prev.sqrt() * x0 + cov / (1 - a_t) * (xt - a_t.sqrt() * x0)
    expected_var = (1 - a_prev) - cov**2 / (1 - a_t)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(logvar.exp(), expected_var)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_parameterizations_recover_x0_and_eps(prediction: str) -> None:
    schedule = NoiseSchedule.named("cosine", 100)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    i = torch.tensor([0, 5, 20, 50, 90, 99])
    xt = q_sample(schedule, x0, i, eps)
    out = eps if prediction == "eps" else v_target(schedule, x0, i, eps)
    x0_hat, eps_hat = predict_x0_eps(schedule, xt, i, out, prediction)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-9)


# ---- the variational bound ---------------------------------------------------------------------


@pytest.mark.parametrize("levels", [256, 17, 2])
def test_discretized_decoder_is_normalized_and_matches_scipy(levels: int) -> None:
    grid = torch.linspace(-1, 1, levels, dtype=torch.float64)
    mean = torch.tensor([-0.95, 0.0, 0.31, 1.2], dtype=torch.float64)[:, None]
    logvar = torch.log(torch.tensor([1e-4, 0.01, 0.3, 2.0], dtype=torch.float64))[:, None]
    nll = discretized_gaussian_nll(grid.expand(4, -1), mean, logvar, levels)
    torch.testing.assert_close(torch.exp(-nll).sum(1), torch.ones(4, dtype=torch.float64))
    half = 1 / (levels - 1)
    std = np.exp(0.5 * logvar.numpy())
    hi = np.where(grid.numpy() > 1 - half, np.inf, grid.numpy() + half)
    lo = np.where(grid.numpy() < -1 + half, -np.inf, grid.numpy() - half)
    prob = norm.cdf((hi - mean.numpy()) / std) - norm.cdf((lo - mean.numpy()) / std)
    ok = prob > 1e-8  # compare where scipy's own difference of CDFs is accurate
    np.testing.assert_allclose(nll.numpy()[ok], -np.log(prob[ok]), rtol=1e-6)
    assert torch.isfinite(nll).all()  # far-tail bins stay finite


def test_prior_term_vanishes_for_a_long_schedule() -> None:
    x0 = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)
    kl_long = prior_kl(NoiseSchedule.named("linear", 1000), x0).item() / x0.numel()
    assert 0 <= kl_long < 1e-4  # nats per dimension; alpha-bar_T ~ 4e-5
    kl_cos = prior_kl(NoiseSchedule.named("cosine", 1000), x0).item() / x0.numel()
    assert 0 <= kl_cos < 1e-6
    short = NoiseSchedule(torch.full((10,), 0.02, dtype=torch.float64))  # alpha-bar_T ~ 0.82: not N(0, I)
    assert prior_kl(short, x0).item() / x0.numel() > 0.1


class Oracle(torch.nn.Module):
    """The exact epsilon of a point-mass data distribution at x0: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""

    def __init__(self, schedule: NoiseSchedule, x0: torch.Tensor) -> None:
        super().__init__()
        self.schedule, self.x0 = schedule, x0

    def forward(self, xt: torch.Tensor, i: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        a = self.schedule.at("sqrt_alphas_cumprod", i, xt)
        s = self.schedule.at("sqrt_one_minus_alphas_cumprod", i, xt)
        return (xt.double() - a * self.x0) / s


def test_bound_terms_sum_to_the_independent_total() -> None:
    """With the exact denoiser of a point mass, every KL term depends only on the variances, so the whole
    bound has a closed form (numpy + scipy): L_T + sum_t KL(beta-tilde_t || beta_t) + the decoder term.
    The full bound must equal it, and the stratified Monte-Carlo estimate must be unbiased."""
    T, levels = 40, 256
    schedule = NoiseSchedule.named("linear", T)
    x0 = (torch.tensor([[0, 37, 128, 255]], dtype=torch.float64) / 255) * 2 - 1
    net = Oracle(schedule, x0)
    betas = schedule.array("betas").numpy()
    ac = schedule.array("alphas_cumprod").numpy()
    bt = betas[1:] * (1 - ac[:-1]) / (1 - ac[1:])  # beta-tilde_t for t = 2..T
    x = x0.numpy()[0]
    # L_T in closed form; KL between equal-mean Gaussians for t = 2..T; decoder with sigma^2 = beta-tilde_2.
    l_T = 0.5 * (-np.log(1 - ac[-1]) + (1 - ac[-1]) + ac[-1] * x**2 - 1)
    kls = 0.5 * (np.log(betas[1:] / bt) + bt / betas[1:] - 1)
    sd = np.sqrt(bt[0])
    hi = np.where(x > 1 - 1 / 255, np.inf, x + 1 / 255)
    lo = np.where(x < -1 + 1 / 255, -np.inf, x - 1 / 255)
    l_0 = -np.log(norm.cdf(hi / sd - x / sd) - norm.cdf(lo / sd - x / sd))
    expected = (l_T + kls.sum() + l_0).sum()

    full = vlb(net, schedule, x0, variance="beta", levels=levels).item()
    assert full == pytest.approx(expected, rel=1e-9)
    # Individual terms: the t = 1 term is the decoder, the others the variance-only KL.
    terms = [vlb_term(net, schedule, x0, torch.tensor([k]), variance="beta").item() for k in range(T)]
    assert terms[0] == pytest.approx(l_0.sum(), rel=1e-9)
    np.testing.assert_allclose(terms[1:], kls * 4, rtol=1e-9, atol=1e-12)
    # With the posterior variance the KL terms vanish: the bound is L_T + L_0 alone.
    post = vlb(net, schedule, x0, variance="posterior", levels=levels).item()
    assert post == pytest.approx((l_T + l_0).sum(), rel=1e-9)
    # Stratified Monte-Carlo over t: unbiased.
    torch.manual_seed(0)
    estimates = torch.stack([vlb(net, schedule, x0, num_timesteps=4) for _ in range(400)]).squeeze(1)
    se = estimates.std().item() / math.sqrt(len(estimates))
    assert abs(estimates.mean().item() - expected) < 5 * se + 1e-9


# ---- samplers ------------------------------------------------------------------------------------


class GaussianDenoiser(torch.nn.Module):
    """Exact E[eps | x_t] for data x_0 ~ N(m, s^2) per dimension:
    sqrt(1 - ab) (x_t - sqrt(ab) m) / (ab s^2 + 1 - ab)."""

    def __init__(self, schedule: NoiseSchedule, m: torch.Tensor, s: torch.Tensor) -> None:
        super().__init__()
        self.schedule, self.m, self.s = schedule, m, s

    def forward(self, xt: torch.Tensor, i: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        ab = self.schedule.at("alphas_cumprod", i, xt)
        return ((1 - ab).sqrt() * (xt.double() - ab.sqrt() * self.m) / (ab * self.s**2 + 1 - ab)).to(xt.dtype)


def _moments_match(samples: torch.Tensor, m: torch.Tensor, s: torch.Tensor, std_rtol: float) -> None:
    """Mean within 5 standard errors; std within `std_rtol` (the T-step chain's discretization bias)."""
    n = samples.shape[0]
    assert ((samples.mean(0) - m).abs() < 5 * s / math.sqrt(n)).all(), (samples.mean(0), m)
    assert ((samples.std(0) / s - 1).abs() < std_rtol).all(), (samples.std(0), s)


def test_ddim_full_steps_eta_one_equals_ancestral_sampling() -> None:
    """DDIM with all T steps and eta = 1 is DDPM ancestral sampling with sigma_t^2 = beta-tilde_t
    (Song et al. 2021 eq. 16). On Gaussian data with the exact denoiser: the two sample sets (independent
    noise) agree in mean and variance within Monte-Carlo error, both reproduce the data's moments (up to
    the 500-step chain's std bias, < 5%), and fed the same noise they follow the same path."""
    T, n = 500, 10000
    schedule = NoiseSchedule.named("linear", T)
    m = torch.tensor([0.5, -0.3], dtype=torch.float64)
    s = torch.tensor([0.2, 0.6], dtype=torch.float64)
    net = GaussianDenoiser(schedule, m, s)
    noise = lambda seed: torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ancestral = ddpm_sample(net, schedule, noise(0), variance="posterior", clip_denoised=False,
                            generator=torch.Generator().manual_seed(1))
    ddim = ddim_sample(net, schedule, noise(2), steps=T, eta=1.0, clip_denoised=False,
                       generator=torch.Generator().manual_seed(3))
    # Two independent samples of one distribution: means within 5 s.e. of their difference, variances
    # within 5 s.e. of the difference of two sample variances (var * sqrt(2/(n-1)) each).
    assert ((ancestral.mean(0) - ddim.mean(0)).abs() < 5 * s * math.sqrt(2 / n)).all()
    assert ((ancestral.var(0) - ddim.var(0)).abs() < 5 * ancestral.var(0) * math.sqrt(4 / (n - 1))).all()
    _moments_match(ancestral, m, s, std_rtol=0.05)
    _moments_match(ddim, m, s, std_rtol=0.05)
    same_noise = ddim_sample(net, schedule, noise(0), steps=T, eta=1.0, clip_denoised=False,
                             generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(same_noise, ancestral, rtol=0, atol=1e-9)


def test_ddim_with_fewer_steps_converges_to_the_full_chain() -> None:
    """Deterministic DDIM (eta = 0) is a first-order discretization of one ODE: with the same noise its
    samples approach the T-step result as the step count grows, and 50 of 1000 steps already give the
    data's moments within 5% (Gaussian data, exact denoiser)."""
    T, n = 1000, 20000
    schedule = NoiseSchedule.named("cosine", T)
    m = torch.tensor([0.5, -0.3], dtype=torch.float64)
    s = torch.tensor([0.5, 0.8], dtype=torch.float64)
    net = GaussianDenoiser(schedule, m, s)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    full = ddim_sample(net, schedule, noise, steps=T, eta=0.0, clip_denoised=False)
    _moments_match(full, m, s, std_rtol=0.02)
    errors = []
    for steps in (10, 20, 50):
        seq = ddim_timesteps(T, steps)
        assert len(seq) == steps and seq[0] == T - 1 and seq[-1] == 0
        out = ddim_sample(net, schedule, noise, steps=steps, eta=0.0, clip_denoised=False)
        errors.append((out - full).abs().mean().item())
    assert errors[0] > errors[1] > errors[2]
    _moments_match(out, m, s, std_rtol=0.05)


def test_ancestral_sampling_with_beta_variance_reaches_the_data_distribution() -> None:
    schedule = NoiseSchedule.named("linear", 200)
    m = torch.tensor([0.5], dtype=torch.float64)
    s = torch.tensor([0.3], dtype=torch.float64)
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = ddpm_sample(GaussianDenoiser(schedule, m, s), schedule, noise, variance="beta", clip_denoised=False)
    assert abs(out.mean().item() - 0.5) < 0.01
    assert abs(out.std().item() / 0.3 - 1) < 0.05


# ---- network and family ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,mult,attn", [((1, 8, 8), (1, 2), (4,)), ((1, 28, 28), (1, 2, 2), (7,)),
                                             ((3, 32, 32), (1, 2, 2, 2), (16,))])
def test_unet_shapes_and_time_dependence(shape: tuple, mult: tuple, attn: tuple) -> None:
    torch.manual_seed(0)
    net = UNet(shape[0], shape[1], base_channels=8, channel_mult=mult, num_res_blocks=1,
               attn_resolutions=attn, dropout=0.0, num_heads=2, num_classes=10)
    for p in net.parameters():  # replace the zero init so the output depends on every input
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, *shape)
    out = net(x, torch.tensor([3, 3]), torch.tensor([1, -1]))
    assert out.shape == x.shape
    assert (out - net(x, torch.tensor([50, 50]), torch.tensor([1, -1]))).abs().max() > 1e-3  # sees t
    assert (out[1] - net(x, torch.tensor([3, 3]), torch.tensor([1, 2]))[1]).abs().max() > 1e-3  # sees y
    assert net(x, torch.tensor([3, 3]), return_features=True).shape == (2, 8 * mult[-1])


def test_pixel_grid_round_trip() -> None:
    for levels in (256, 17):
        stored = torch.round(torch.arange(levels) * 255.0 / (levels - 1)).to(torch.uint8)
        unit = images_to_unit(stored, levels)
        torch.testing.assert_close(unit, torch.linspace(-1, 1, levels))
        assert torch.equal(unit_to_images(unit, levels), stored)


def _digits(n: int) -> torch.Tensor:
    """The first n scikit-learn digits as the data pipeline stores them (uint8, round(v * 255 / 16))."""
    from sklearn.datasets import load_digits

    return torch.from_numpy(np.round(load_digits().images[:n] * 255 / 16).astype(np.uint8))[:, None]


def _tiny_cfg(**over) -> DiffusionConfig:
    base = dict(timesteps=50, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
                dropout=0.0, nll_timesteps=5, sampler="ddim", sample_steps=5)
    return DiffusionConfig(**{**base, **over})


def _trainer(steps: int, precision: str = "32-true") -> L.Trainer:
    return L.Trainer(max_steps=steps, precision=precision, accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=1)


def test_family_trains_with_lightning_and_reports_a_bound() -> None:
    images = _digits(256)
    torch.manual_seed(0)
    model = Diffusion(_tiny_cfg(class_conditional=True), OptimConfig(lr=2e-3), DataSpec(shape=(1, 8, 8)))
    batch = {"x": images[:64], "y": torch.arange(64) % 10}
    with torch.no_grad():
        before = torch.stack([model.loss(batch)[0] for _ in range(4)]).mean()
    trainer = _trainer(40)
    labelled = Images(images, torch.arange(len(images)) % 10)
    trainer.fit(model, DataLoader(labelled, batch_size=32, shuffle=True), DataLoader(labelled, batch_size=64))
    bpd = trainer.callback_metrics["val/bpd"].item()
    assert math.isfinite(bpd) and 0 < bpd < 100
    with torch.no_grad():
        after = torch.stack([model.loss(batch)[0] for _ in range(4)]).mean()
    assert after < 0.8 * before  # L_simple falls from ~1 (the zero-initialised output predicts nothing)
    samples = model.sample(4, torch.tensor([0, 1, 2, 3]))
    assert samples.shape == (4, 1, 8, 8) and samples.dtype == torch.uint8
    assert model.encode(images[:3]).shape == (3, 32)


def test_family_runs_in_bf16_mixed_precision_with_v_prediction() -> None:
    images = _digits(32)
    torch.manual_seed(0)
    model = Diffusion(_tiny_cfg(prediction="v", schedule="cosine", nll_timesteps=2), OptimConfig(lr=1e-3),
                      DataSpec(shape=(1, 8, 8)))
    trainer = _trainer(3, "bf16-mixed")
    labelled = Images(images, torch.arange(len(images)) % 10)
    trainer.fit(model, DataLoader(labelled, batch_size=16), DataLoader(torch.utils.data.Subset(labelled, range(8)), 8))
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert math.isfinite(trainer.callback_metrics["val/bpd"].item())
