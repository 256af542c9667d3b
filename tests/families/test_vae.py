"""VAE mathematics against independent computations, and the family trained for real on digits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from scalegen.config.schema import OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.errors import ConfigError
from scalegen.families.vae import VAE, VAEConfig, _static_uniform
from scalegen.objectives.elbo import discretized_log_prob, gaussian_kl, log_normal
from scalegen.runtime import load_model


def test_gaussian_kl_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g) * 0.5
    pmu, plogvar = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g) * 0.5
    n = 200_000
    z = mu + torch.randn(n, 3, 5, generator=g) * (0.5 * logvar).exp()
    log_ratio = log_normal(z, mu, logvar) - log_normal(z, pmu, plogvar)  # [n, 3]
    estimate, stderr = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(n)
    closed = gaussian_kl(mu, logvar, pmu, plogvar)
    assert torch.all((estimate - closed).abs() < 4 * stderr + 1e-4), (estimate, closed, stderr)


@pytest.mark.parametrize("dist", ["logistic", "gaussian"])
@pytest.mark.parametrize("mean, log_scale", [(0.0, 0.0), (0.3, -4.0), (-0.99, -6.0), (0.7, 1.5)])
def test_discretized_likelihood_sums_to_one_over_256_levels(dist: str, mean: float, log_scale: float) -> None:
    x = torch.arange(256, dtype=torch.uint8).view(256, 1)
    logp = discretized_log_prob(x, torch.full((256, 1), mean), torch.full((256, 1), log_scale), dist)
    assert abs(logp.double().exp().sum().item() - 1) < 1e-5
    # An interior bin equals the CDF difference computed directly.
    scale = math.exp(log_scale)
    cdf = (lambda u: 1 / (1 + math.exp(-u))) if dist == "logistic" else (lambda u: 0.5 * math.erfc(-u / math.sqrt(2)))
    v = 100 / 127.5 - 1
    direct = cdf((v + 1 / 255 - mean) / scale) - cdf((v - 1 / 255 - mean) / scale)
    assert logp[100].exp().item() == pytest.approx(direct, rel=1e-4, abs=1e-12)


def test_binarization_modes() -> None:
    x = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    u1, u2 = _static_uniform(x), _static_uniform(x[[3, 1]])
    assert torch.equal(u1[[3, 1]], u2)  # static noise depends on the image alone, not on the batch
    assert 0.45 < u1.mean() < 0.55 and u1.min() >= 0 and u1.max() < 1
    model = VAE(VAEConfig(likelihood="bernoulli", binarize="dynamic"), OptimConfig(), DataSpec(shape=(1, 8, 8)))
    grey = torch.full((4000, 1, 8, 8), 64, dtype=torch.uint8)
    rate = model._targets(grey, train=True)[0].mean().item()
    assert abs(rate - 64 / 255) < 0.01  # dynamic binarization: P(1) equals the intensity


def test_kl_warmup_and_beta() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    warm = VAE(VAEConfig(kl_warmup_steps=100, beta=4.0), OptimConfig(), DataSpec(shape=(1, 8, 8)))
    _, logs = warm.loss({"x": x})
    assert logs["beta"] == 0.0  # step 0 of the warm-up: KL weight 0
    plain = VAE(VAEConfig(beta=4.0), OptimConfig(), DataSpec(shape=(1, 8, 8)))
    torch.manual_seed(1)
    loss, logs = plain.loss({"x": x})
    assert loss.item() == pytest.approx((logs["recon_nats"] + 4.0 * logs["kl_nats"]).item(), rel=1e-5)


def _test_batch(cfg_overrides: tuple[str, ...] = ()) -> dict:
    from scalegen.config import load_config
    from scalegen.data import build_datamodule

    dm = build_datamodule(load_config("quickstart", list(cfg_overrides)).data)
    dm.setup("test")
    xs, ys = zip(*[(b["x"], b["y"]) for b in dm.test_dataloader()])
    return {"x": torch.cat(xs), "y": torch.cat(ys)}


def test_training_lowers_the_negative_elbo(trained_vae: Path) -> None:
    batch = _test_batch()
    model, cfg = load_model(trained_vae)
    torch.manual_seed(0)
    fresh = VAE(cfg.model, cfg.optim, model.data_spec).eval()
    with torch.no_grad():
        before, after = fresh.nll(batch["x"]).mean().item(), model.nll(batch["x"]).mean().item()
    # A clear margin: 30 nats per 8x8 image is 0.68 bits/dim.
    assert before - after > 30, (before, after)


def test_iwae_bound_is_tighter_than_elbo_and_tightens_with_k(trained_vae: Path) -> None:
    x = _test_batch()["x"][:200]
    model, _ = load_model(trained_vae)
    torch.manual_seed(0)
    with torch.no_grad():
        bounds = {k: model.nll(x, k=k).mean().item() for k in (1, 5, 50, 500)}
    assert bounds[1] > bounds[5] > bounds[50] > bounds[500], bounds
    assert bounds[1] - bounds[500] > 0.5, bounds  # a clear gap in nats, not Monte-Carlo noise


def test_conditional_vae_samples_the_asked_class(tmp_path: Path, train_recipe) -> None:
    run = train_recipe("quickstart", tmp_path / "cvae", "model.conditional=true", "trainer.max_epochs=30")
    model, _ = load_model(run)
    train = _test_batch()  # the classifier is trained on held-out test digits, independent of the VAE
    clf = LogisticRegression(max_iter=2000).fit(train["x"].flatten(1).float().numpy() / 255, train["y"].numpy())
    torch.manual_seed(0)
    y = torch.arange(10).repeat_interleave(30)
    samples = model.sample(len(y), y)
    accuracy = float(np.mean(clf.predict(samples.flatten(1).float().numpy() / 255) == y.numpy()))
    assert accuracy > 0.8, accuracy


def test_iwae_training_objective_runs_and_is_a_bound() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(iwae_k=8, hidden=[32]), OptimConfig(), DataSpec(shape=(1, 8, 8)))
    x = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    loss, _ = model.loss({"x": x})
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        assert model.nll(x, k=8).mean() <= model.nll(x, k=1).mean() + 1.0


def test_training_step_logs_only_on_the_first_logging_and_last_steps() -> None:
    """`GenerativeModel.training_step` calls `self.log` only where it is read (see `logs_this_step`)."""
    import lightning as L

    torch.manual_seed(0)
    model = VAE(VAEConfig(hidden=[16], latent_dim=2), OptimConfig(lr=1e-3), DataSpec(shape=(1, 8, 8)))
    logged: list[int] = []
    log = model.log

    def spy(name, *args, **kwargs):
        if name == "train/loss":
            logged.append(model.global_step)
        return log(name, *args, **kwargs)

    model.log = spy
    x = torch.randint(0, 256, (8 * 25, 1, 8, 8), dtype=torch.uint8)
    batches = [{"x": b, "y": torch.zeros(len(b), dtype=torch.int64)} for b in x.split(8)]
    trainer = L.Trainer(max_steps=25, log_every_n_steps=10, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    assert logged == [0, 9, 19, 24]  # first step, every 10th (as Lightning's loggers write), last
    assert "train/loss" in trainer.callback_metrics


def test_encode_sample_draws_from_the_posterior_whose_mean_encode_returns() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=3), OptimConfig(), DataSpec(shape=(1, 8, 8))).eval()
    with torch.no_grad():  # a posterior with a visible spread: the log-variance outputs raised by 1
        model.encoder.net[-1].bias[3:] += 1.0
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    mu, logvar = model.posterior_params(x)[:, :3], model.posterior_params(x)[:, 3:6]
    draws = torch.stack([model.encode_sample(x) for _ in range(4000)])  # [4000, 4, 3]
    sd = (0.5 * logvar).exp()
    # Monte Carlo: the mean of 4000 draws is within 5 standard errors of mu; the spread within 5 %.
    assert (draws.mean(0) - mu).abs().max() < 5 * sd.max() / math.sqrt(4000)
    torch.testing.assert_close(draws.std(0), sd, rtol=0.05, atol=0.0)
    torch.testing.assert_close(model.encode(x), mu)


def test_encode_sample_refuses_discrete_latents_naming_the_fix() -> None:
    model = VAE(VAEConfig(latent="bernoulli", latent_dim=3), OptimConfig(), DataSpec(shape=(1, 8, 8)))
    with pytest.raises(ConfigError, match="model.latent=gaussian"):
        model.encode_sample(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
