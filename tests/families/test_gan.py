"""GAN family: losses and penalties against closed forms, the optimal discriminator on a 1-D toy,
manual-optimization semantics (alternation, accumulation, clipping, mixed precision, DDP) and a
short run on digits that lowers the domain FID."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from image_data import Images
from torch.utils.data import DataLoader

from scalegen.config.schema import OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.families.gan import GAN, GANConfig
from scalegen.nets.dcgan import Discriminator, Generator, num_stages
from scalegen.objectives.gan import (
    clip_weights,
    critic_emd,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    r1_penalty,
)

REPO = Path(__file__).resolve().parents[2]

# ---- objectives --------------------------------------------------------------------------------------


def test_losses_match_their_definitions() -> None:
    d_real = torch.tensor([2.0, -0.5, 0.3, 1.5], dtype=torch.float64)
    d_fake = torch.tensor([-1.0, 0.7, -3.0, 0.2], dtype=torch.float64)
    sig = lambda v: 1 / (1 + np.exp(-v.numpy()))
    ns_d = np.mean(-np.log(sig(d_real))) + np.mean(-np.log(1 - sig(d_fake)))
    assert discriminator_loss(d_real, d_fake, "non_saturating").item() == pytest.approx(ns_d, rel=1e-12)
    assert generator_loss(d_fake, "non_saturating").item() == pytest.approx(np.mean(-np.log(sig(d_fake))))
    hinge_d = np.mean(np.maximum(0, 1 - d_real.numpy())) + np.mean(np.maximum(0, 1 + d_fake.numpy()))
    assert discriminator_loss(d_real, d_fake, "hinge").item() == pytest.approx(hinge_d, rel=1e-12)
    assert generator_loss(d_fake, "hinge").item() == pytest.approx(-d_fake.mean().item())


def test_minimax_and_wasserstein_losses_match_their_definitions() -> None:
    d_real = torch.tensor([2.0, -0.5, 0.3, 1.5], dtype=torch.float64)
    d_fake = torch.tensor([-1.0, 0.7, -3.0, 0.2], dtype=torch.float64)
    sig = 1 / (1 + np.exp(-d_fake.numpy()))
    assert generator_loss(d_fake, "minimax").item() == pytest.approx(np.mean(np.log(1 - sig)), rel=1e-12)
    assert discriminator_loss(d_real, d_fake, "minimax").item() == discriminator_loss(d_real, d_fake).item()
    emd = d_real.mean() - d_fake.mean()
    assert critic_emd(d_real, d_fake).item() == pytest.approx(emd.item())
    assert discriminator_loss(d_real, d_fake, "wasserstein").item() == pytest.approx(-emd.item())
    assert generator_loss(d_fake, "wasserstein").item() == pytest.approx(-d_fake.mean().item())


def test_minimax_generator_gradient_saturates_where_the_discriminator_rejects_fakes() -> None:
    """d/dl log(1 - sigmoid(l)) = -sigmoid(l) -> 0 as l -> -inf; d/dl -log sigmoid(l) = -(1 - sigmoid(l)) -> -1."""
    logits = torch.tensor([-8.0, -4.0, 0.0, 3.0], dtype=torch.float64, requires_grad=True)
    for kind, expected in (("minimax", -torch.sigmoid(logits)), ("non_saturating", torch.sigmoid(logits) - 1)):
        (grad,) = torch.autograd.grad(generator_loss(logits, kind) * len(logits), logits)
        torch.testing.assert_close(grad, expected.detach())


def _train_critic(real, fake, *, lam: float | None = None, clip: float | None = None, steps: int = 300):
    """A 64-unit tanh MLP critic trained on the Wasserstein loss (+ lam * GP, or weight clipping);
    returns its EMD estimate E D(real) - E D(fake) on 100,000 fresh samples."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                              torch.nn.Linear(64, 1))
    D = lambda x: net(x).flatten()  # noqa: E731
    opt = torch.optim.Adam(net.parameters(), lr=1e-3 if clip is None else 5e-3, betas=(0.5, 0.9))
    for _ in range(steps):
        r, g = real(512), fake(512)
        loss = discriminator_loss(D(r), D(g), "wasserstein")
        if lam is not None:
            loss = loss + lam * gradient_penalty(D, r, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if clip is not None:
            clip_weights(net, clip)
    if clip is not None:
        assert all(p.abs().max() <= clip for p in net.parameters())
    with torch.no_grad():
        return critic_emd(D(real(100_000)), D(fake(100_000))).item()


_gauss = lambda mu: lambda n: torch.randn(n, 1) + mu  # noqa: E731
_unif = lambda a: lambda n: torch.rand(n, 1) + a  # noqa: E731


@pytest.mark.parametrize("real,fake,w1", [(_gauss(0), _gauss(1.5), 1.5), (_unif(0), _unif(0.5), 0.5)],
                         ids=["gaussians", "uniforms"])
def test_wgan_gp_critic_estimates_the_earth_movers_distance(real, fake, w1) -> None:
    """Equal-variance Gaussians N(0, 1), N(1.5, 1) and uniforms U(0, 1), U(0.5, 1.5) are shifts: W1 = the
    shift. With lambda = 100 the trained critic's estimate is within 3% of it (1,000 Adam steps: after 300
    the estimate still varied by +-3.5% across seeds, and with the kernels of the CPU)."""
    assert _train_critic(real, fake, lam=100.0, steps=1000) == pytest.approx(w1, rel=0.03)


def test_wgan_gp_estimate_carries_the_penalty_bias_of_a_soft_constraint() -> None:
    """The penalty is soft: for a shift by W1 the optimal critic is linear, f = s x, and maximizing
    s W1 - lambda (s - 1)^2 gives s = 1 + W1 / (2 lambda): an estimate of W1 (1 + W1 / (2 lambda)),
    1.6125 for W1 = 1.5, lambda = 10 (within 2%), so a larger lambda approaches W1 itself."""
    assert _train_critic(_gauss(0), _gauss(1.5), lam=10.0) == pytest.approx(1.5 * (1 + 1.5 / 20), rel=0.02)


def test_weight_clipped_critic_estimates_w1_up_to_a_fixed_scale() -> None:
    """Clipping bounds the critic's Lipschitz constant by some K set by the architecture and c, not by the
    data, so the estimate is K W1: doubling the shift doubles it (within 10%, 300 steps)."""
    one = _train_critic(_gauss(0), _gauss(1.0), clip=0.1)
    two = _train_critic(_gauss(0), _gauss(2.0), clip=0.1)
    assert two / one == pytest.approx(2.0, rel=0.1)


def test_penalties_match_closed_forms_for_a_linear_discriminator() -> None:
    """For D(x) = <w, x> + b the input gradient is w everywhere: R1 = ||w||^2, GP = (||w|| - 1)^2."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 1)
    D = lambda x: lin(x.flatten(1)).flatten()
    w2 = lin.weight.pow(2).sum().item()
    real = torch.randn(5, 3, 2, 2, requires_grad=True)
    assert r1_penalty(D(real), real).item() == pytest.approx(w2, rel=1e-5)
    fake = torch.randn(5, 3, 2, 2)
    assert gradient_penalty(D, real, fake).item() == pytest.approx((math.sqrt(w2) - 1) ** 2, rel=1e-5)
    # The penalty is differentiable in D's parameters (it is trained): d||w||^2/dw = 2w.
    (grad,) = torch.autograd.grad(r1_penalty(D(real), real), lin.weight)
    torch.testing.assert_close(grad, 2 * lin.weight.detach())


def _density(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def _train_toy_discriminator(kind: str, steps: int = 600) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p_data = N(0, 1); a fixed generator G(z) = 1 + 0.7 z, so p_g = N(1, 0.49).

    Returns D's logits, p_data and p_g on a grid of x."""
    torch.manual_seed(0)
    D = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                            torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(D.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        real, fake = torch.randn(512, 1), 1 + 0.7 * torch.randn(512, 1)
        loss = discriminator_loss(D(real).flatten(), D(fake).flatten(), kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    x = torch.linspace(-1.5, 2.5, 201)[:, None]  # where both densities carry mass
    p_data, p_g = _density(x, 0, 1), _density(x, 1, 0.7)
    with torch.no_grad():
        return D(x).flatten(), p_data.flatten(), p_g.flatten()


def test_trained_discriminator_approaches_the_optimal_discriminator() -> None:
    """Goodfellow et al. 2014 Prop. 1: for fixed G, sigmoid(D*(x)) = p_data / (p_data + p_g).
    Tolerance: 0.05 at every grid point, 0.015 on average (600 Adam steps of a 64-unit MLP)."""
    logits, p_data, p_g = _train_toy_discriminator("non_saturating")
    err = (torch.sigmoid(logits) - p_data / (p_data + p_g)).abs()
    assert err.max() < 0.05 and err.mean() < 0.015, (err.max(), err.mean())


def test_hinge_discriminator_approaches_the_sign_of_the_density_difference() -> None:
    """The hinge loss's optimal D is sign(p_data - p_g) (clipped to [-1, 1]); checked where the densities
    differ by more than 20% of their sum."""
    logits, p_data, p_g = _train_toy_discriminator("hinge")
    clear = ((p_data - p_g) / (p_data + p_g)).abs() > 0.2
    target = torch.sign(p_data - p_g)[clear]
    assert torch.equal(torch.sign(logits[clear]), target)
    assert (logits.clamp(-1, 1)[clear] - target).abs().max() < 0.3


# ---- networks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,size,stages", [(1, 8, 1), (1, 28, 2), (3, 32, 3), (3, 64, 4)])
def test_dcgan_networks_fit_the_image_size(channels: int, size: int, stages: int) -> None:
    assert num_stages(size) == stages
    G = Generator(16, channels, size, base_channels=8)
    D = Discriminator(channels, size, base_channels=8)
    images = G(torch.randn(3, 16))
    assert images.shape == (3, channels, size, size) and images.abs().max() <= 1
    assert D(images).shape == (3,)
    # Radford et al. sec. 5.1 features: each layer max-pooled to <= 4x4, concatenated.
    expected = sum(8 * 2**k * min(4, size >> (k + 1)) ** 2 for k in range(stages))
    assert D.features(images).shape == (3, expected)


# ---- manual optimization ---------------------------------------------------------------------------


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as the data pipeline stores them: uint8 round(v * 255 / 16), and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:, None]
    return images, torch.from_numpy(d.target)


def _gan(optim: OptimConfig | None = None, **over) -> GAN:
    cfg = GANConfig(**{**dict(latent_dim=8, g_channels=8, d_channels=8), **over})
    return GAN(cfg, optim or OptimConfig(name="adam", lr=2e-4, betas=[0.5, 0.999]), DataSpec(shape=(1, 8, 8)))


def _fit(model: GAN, images: torch.Tensor, steps: int, batch_size: int, precision: str = "32-true"
         ) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, precision=precision, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(Images(images), batch_size=batch_size, shuffle=False))
    return trainer


def test_alternating_updates_with_k_discriminator_steps_and_accumulation() -> None:
    """d_steps = 2, accumulation 2: every 2 batches D steps once, every 2 D steps G steps once; Lightning's
    global_step (max_steps) counts both networks' steps. Counted from the optimizers' own state."""
    images = _digits()[0][:64]
    model = _gan(d_steps=2)
    model.configure_manual_optimization(accumulate_grad_batches=2)
    trainer = _fit(model, images, steps=6, batch_size=4)
    opt_d, opt_g = (o.optimizer if hasattr(o, "optimizer") else o for o in trainer.optimizers)
    d_steps = {int(s["step"]) for s in opt_d.state.values()}
    g_steps = {int(s["step"]) for s in opt_g.state.values()}
    assert d_steps == {4} and g_steps == {2} and trainer.global_step == 6
    assert model.micro_batches == [8, 4]  # 4 D updates x 2 micro-batches; 2 G updates x 2


def test_wgan_with_weight_clipping_keeps_the_critic_in_the_box_and_logs_its_emd() -> None:
    """loss=wasserstein, weight_clip=c: after training every critic parameter lies in [-c, c] (some at the
    bound: the clip acted), and the loss dict carries the critic's EMD estimate E D(x) - E D(G(z))."""
    images = _digits()[0][:64]
    torch.manual_seed(0)
    model = _gan(OptimConfig(name="adam", lr=1e-2), loss="wasserstein", weight_clip=0.01, d_steps=5, d_norm="none")
    _fit(model, images, steps=12, batch_size=16)
    params = torch.cat([p.detach().flatten() for p in model.discriminator.parameters()])
    assert params.abs().max() <= 0.01 and (params.abs() == 0.01).any()
    loss, logs = model.loss({"x": images[:16]})
    assert logs["emd"].item() == pytest.approx(-loss.item())  # the critic's loss is minus its estimate
    assert logs["emd"].item() == pytest.approx((logs["d_real"] - logs["d_fake"]).item())


def test_accumulation_equals_one_larger_batch() -> None:
    """Two accumulated micro-batches of 8 give the same D and G updates as one batch of 16 (no batch
    norm, plain SGD; the noise draws line up because torch.randn(16) == cat(randn(8), randn(8)))."""
    images = _digits()[0][:64]
    sgd = OptimConfig(name="sgd", lr=0.5, momentum=0.0)
    results = []
    for accumulate, batch in ((2, 8), (1, 16)):
        torch.manual_seed(0)
        model = _gan(sgd, g_norm="none", d_norm="none")
        initial = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        model.configure_manual_optimization(accumulate_grad_batches=accumulate)
        torch.manual_seed(1)
        _fit(model, images, steps=2, batch_size=batch)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (results[0] - initial).abs().max() > 1e-4  # both networks moved
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradient_clipping_under_manual_optimization(precision: str) -> None:
    """With SGD (lr, no momentum) one step moves each network by exactly lr * clip when its gradient norm
    exceeds clip; without clipping the same step moves them much further."""
    images = _digits()[0][:32]
    lr, clip = 0.1, 1e-3
    moves = {}
    for clip_val in (clip, None):
        torch.manual_seed(0)
        model = _gan(OptimConfig(name="sgd", lr=lr, momentum=0.0))
        before = [torch.cat([p.detach().flatten().clone() for p in net.parameters()])
                  for net in (model.discriminator, model.generator)]
        model.configure_manual_optimization(gradient_clip_val=clip_val)
        _fit(model, images, steps=2, batch_size=16, precision=precision)  # one D step, one G step
        after = [torch.cat([p.detach().flatten() for p in net.parameters()])
                 for net in (model.discriminator, model.generator)]
        moves[clip_val] = [(a - b).norm().item() for a, b in zip(after, before)]
    assert moves[clip] == pytest.approx([lr * clip, lr * clip], rel=1e-3)
    assert min(moves[None]) > 10 * lr * clip


@pytest.mark.parametrize("penalty", ["r1", "gp"])
def test_bf16_mixed_precision_runs_with_penalties(penalty: str) -> None:
    images = _digits()[0][:32]
    torch.manual_seed(0)
    model = _gan(loss="hinge" if penalty == "gp" else "non_saturating", penalty=penalty, d_norm="none")
    trainer = _fit(model, images, steps=4, batch_size=8, precision="bf16-mixed")
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/g_loss", f"train/{penalty}"):
        assert math.isfinite(metrics[key].item()), key
    assert model.sample(3).dtype == torch.uint8


@pytest.mark.slow
def test_ddp_two_processes_keep_identical_networks(tmp_path: Path) -> None:
    """Two CPU processes (gloo), each seeing different batches, with R1, accumulation and clipping: after
    training both ranks hold the same weights (gradients were all-reduced for every step of both
    networks), and the weights moved."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("gan_ddp_worker.py")
    done = subprocess.run([sys.executable, str(worker), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["batches"] != ranks[1]["batches"]  # different data on each rank
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    assert (ranks[0]["params"] - ranks[0]["initial"]).abs().max() > 1e-4
    assert ranks[0]["d_updates"] == 4 and ranks[0]["global_step"] == 6


# ---- a short run lowers the domain FID -------------------------------------------------------------


def test_short_run_on_digits_lowers_domain_fid() -> None:
    """The domain FID (scalegen.metrics.domain: the 64-d features of a small digit classifier trained on
    the training digits) of 500 samples against 300 held-out digits falls below half its initial value
    after 100 D + 100 G steps."""
    from scalegen.metrics.domain import DomainTraining, train_domain_classifier
    from scalegen.metrics.fid import fid_from_features

    x, y = _digits()
    train, held_out = x[:1497], x[1497:]
    classifier = train_domain_classifier(train, y[:1497], 10, DomainTraining(epochs=3))
    real = classifier(held_out)[0]
    torch.manual_seed(0)
    model = _gan(OptimConfig(name="adam", lr=2e-3, betas=[0.5, 0.999]), latent_dim=32, g_channels=32,
                 d_channels=32)

    def fid() -> float:
        model.eval()
        with torch.no_grad():
            return fid_from_features(classifier(model.sample(500))[0], real)

    initial = fid()
    trainer = L.Trainer(max_steps=200, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, DataLoader(Images(train), batch_size=64, shuffle=True, drop_last=True))
    final = fid()
    assert final < 0.5 * initial, (initial, final)
