"""The VAE's inference options trained from their tiny recipes and evaluated: posterior flows, two
stochastic layers, discrete latents (NVIL, Gumbel-softmax) and the inference-gap metric."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from scalegen.config.schema import EvalConfig, OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.errors import ConfigError
from scalegen.eval.data import EvalData
from scalegen.eval.runner import evaluate
from scalegen.families.vae import VAE, VAEConfig
from scalegen.runtime import load_model


def _digits(cfg) -> EvalData:
    return EvalData.from_config(cfg.data)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", ["vae/tiny-flows", "vae/tiny-2layer", "vae/tiny-bernoulli", "vae/tiny-categorical"])
def test_tiny_option_recipe_trains_and_lowers_the_bound(recipe: str, tmp_path: Path, train_recipe) -> None:
    run = train_recipe(recipe, tmp_path / "run")
    model, cfg = load_model(run)
    x, y = _digits(cfg).split("test", 300)
    torch.manual_seed(0)
    fresh = VAE(cfg.model, cfg.optim, model.data_spec).eval()
    with torch.no_grad():
        before, after = fresh.nll(x).mean().item(), model.nll(x).mean().item()
        iwae = model.nll(x, k=20).mean().item()
    assert before - after > 15, (before, after)  # nats per 8x8 digit: it learned
    assert iwae < after + 0.5  # the IWAE-20 bound is at least as tight (up to Monte-Carlo noise)
    res = evaluate(model, EvalConfig(max_examples=200, iwae_k=20, batch_size=100), _digits(cfg), tmp_path / "ev",
                   metrics="bpd", log_wandb=False)
    assert math.isfinite(res["metrics"]["bpd"]["value"]) and "IWAE-20" in res["metrics"]["bpd"]["quantity"]
    if cfg.model.latent2_dim:  # the gaps of a two-layer model: q(z1|x)'s parameters optimized, q(z2|z1) fixed
        ev = EvalConfig(gap_examples=20, gap_steps=20, gap_lr=3e-2, gap_samples=20, iwae_k=50, batch_size=20)
        gap = evaluate(model, ev, _digits(cfg), None, metrics="inference_gap", log_wandb=False)["metrics"]
        assert gap["inference_gap"]["amortization_gap"]["mean"] > -3 * gap["inference_gap"]["amortization_gap"]["sem"]
    rows = _metrics(run)
    if cfg.model.latent == "bernoulli":  # the gradient-variance diagnostic is logged
        assert any("train/enc_grad_var" in r and r["train/enc_grad_var"] > 0 for r in rows)
    if cfg.model.estimator == "gumbel_st":  # the temperature anneals towards its floor
        m = cfg.model
        taus = [(r["step"], r["train/temperature"]) for r in rows if "train/temperature" in r]
        for step, tau in taus:  # tau = max(min, start * exp(-decay * step))
            expected = max(m.temperature_min, m.temperature * math.exp(-m.temperature_decay * step))
            assert tau == pytest.approx(expected, rel=2 * m.temperature_decay), (step, tau)
        assert taus[-1][1] < 0.6


def test_inference_gap_metric_in_the_report(trained_vae: Path, tmp_path: Path) -> None:
    model, cfg = load_model(trained_vae)
    ev = EvalConfig(gap_examples=40, gap_steps=30, gap_lr=3e-2, gap_samples=50, iwae_k=200, batch_size=40)
    res = evaluate(model, ev, _digits(cfg), tmp_path, metrics="inference_gap", log_wandb=False)
    gap = res["metrics"]["inference_gap"]
    assert gap["count"] == 40 and gap["unit"] == "nats"
    # Optimizing each posterior can only help (beyond Monte-Carlo noise), and the IWAE bound is above it.
    assert gap["amortization_gap"]["mean"] > -3 * gap["amortization_gap"]["sem"]
    assert gap["approximation_gap"]["mean"] > -3 * gap["approximation_gap"]["sem"]
    total = gap["approximation_gap"]["mean"] + gap["amortization_gap"]["mean"]
    assert gap["value"] == pytest.approx(total)
    report = (tmp_path / "report.md").read_text()
    assert "## Inference gaps" in report and "amortization gap" in report
    assert (tmp_path / "inference_gap.png").stat().st_size > 1000


def test_inference_gap_is_skipped_for_discrete_latents(tmp_path: Path) -> None:
    model = VAE(VAEConfig(latent="bernoulli", hidden=[16]), OptimConfig(), DataSpec(shape=(1, 8, 8)))
    x = torch.randint(0, 17, (20, 1, 8, 8), dtype=torch.uint8)
    data = EvalData.from_arrays("d", model.data_spec, {"test": (x, torch.zeros(20, dtype=torch.long))})
    res = evaluate(model, EvalConfig(), data, None, metrics="inference_gap", log_wandb=False)
    assert "inference_gap" in res["skipped"] and "inference_gap" not in res["metrics"]


@pytest.mark.parametrize("overrides", [dict(latent="bernoulli", posterior="iaf"),
                                       dict(latent2_dim=4, conditional=True)])
def test_unsupported_combinations_are_config_errors(overrides: dict) -> None:
    with pytest.raises(ConfigError, match="model"):
        VAE(VAEConfig(**overrides), OptimConfig(), DataSpec(shape=(1, 8, 8)))


def test_encoder_gradient_variance_is_lower_with_control_variates() -> None:
    """The training diagnostic on a fresh model and one batch: NVIL's moving average and baseline (warmed
    up on this batch) give a lower encoder-gradient variance than the plain score function."""
    x = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    var = {}
    for est in ("reinforce", "reinforce_ma"):
        torch.manual_seed(0)
        m = VAE(VAEConfig(latent="bernoulli", estimator=est, hidden=[32], latent_dim=8, grad_var_samples=16,
                          likelihood="bernoulli"), OptimConfig(), DataSpec(shape=(1, 8, 8)))
        inp, target = m._targets(x, train=True)
        for _ in range(20):  # warm the moving average up
            m._objective(inp, target, None, update=True)
        var[est] = m.encoder_gradient_variance(inp, target).item()
    assert var["reinforce"] / var["reinforce_ma"] > 2, var


@pytest.mark.parametrize("posterior", ["full", "planar", "iaf"])
def test_training_loss_and_bound_agree_in_expectation(posterior: str) -> None:
    """The training objective (closed-form KL for `full`, Monte-Carlo for flows) and nll's log-weights are
    two estimators of the same negative ELBO: their means agree within Monte-Carlo error."""
    torch.manual_seed(0)
    m = VAE(VAEConfig(posterior=posterior, hidden=[32], latent_dim=4, flow_steps=2, flow_hidden=8,
                      likelihood="bernoulli", binarize="static"), OptimConfig(), DataSpec(shape=(1, 8, 8))).eval()
    with torch.no_grad():  # move the flows and L off their identity start
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    inp, target = m._targets(x, train=False)
    with torch.no_grad():
        losses = torch.stack([m._objective(inp, target, None, update=False)[0] for _ in range(1000)])
        bound = -m.log_weights(x, None, 1000).mean(1)  # per sample, averaged over the batch
    se = (losses.var() / len(losses) + bound.var() / len(bound)).sqrt()
    assert abs(losses.mean() - bound.mean()) < 4 * se, (losses.mean(), bound.mean(), se)
