"""The ODE likelihood of DDPM (the probability-flow ODE, Diffusion.velocity) and `bpd_ode` in the runner.

The closed-form case: data x0 ~ N(mu, diag s^2). Under the forward process x_i = a_i x0 + sigma_i eps the
marginal is N(a_i mu, a_i^2 s^2 + sigma_i^2), and the optimal noise predictor is E[eps | x_i] =
sigma_i (x_i - a_i mu) / (a_i^2 s^2 + sigma_i^2) (with v = a eps - sigma x0 for the v parameterization). With
it the probability-flow ODE moves the marginals exactly, so its log-density at the data end (timestep 1) is
log N(y; a_1 mu, a_1^2 s^2 + sigma_1^2), up to the prior approximation N(0, I) for the last marginal, which is
known in closed form too (the flow is the affine map between the two Gaussians).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from toy_models import FactorizedCategorical, make_model  # noqa: E402

from scalegen.cli.main import main  # noqa: E402
from scalegen.config.schema import EvalConfig, OptimConfig  # noqa: E402
from scalegen.dataspec import DataSpec, images_to_unit, unit_to_images  # noqa: E402
from scalegen.eval.data import EvalData  # noqa: E402
from scalegen.eval.runner import evaluate, parse_metrics  # noqa: E402
from scalegen.families.diffusion import Diffusion, DiffusionConfig  # noqa: E402
from scalegen.objectives.diffusion import NoiseSchedule, continuous_log_alpha_bar  # noqa: E402
from scalegen.objectives.ode_likelihood import dequantize, ode_log_prob  # noqa: E402

DT = torch.float64


class OptimalNet(nn.Module):
    """The exact eps (or v) predictor of the diffusion of N(mu, diag s^2) data, at fractional timesteps."""

    def __init__(self, schedule: NoiseSchedule, mu: Tensor, s: Tensor, prediction: str) -> None:
        super().__init__()
        self.schedule, self.prediction = schedule, prediction
        self.mu = nn.Parameter(mu, requires_grad=False)  # float64 parameters: the runner integrates in float64
        self.s = nn.Parameter(s, requires_grad=False)

    def forward(self, x: Tensor, tau: Tensor, y: Tensor | None = None) -> Tensor:
        log_ab, _ = continuous_log_alpha_bar(self.schedule, tau)
        ab = log_ab.exp().reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        a, sigma = ab.sqrt(), (1 - ab).sqrt()
        eps = sigma * (x - a * self.mu) / (ab * self.s**2 + 1 - ab)
        if self.prediction == "eps":
            return eps
        return a * eps - sigma * (x - sigma * eps) / a


def gaussian_ddpm(prediction: str = "eps", timesteps: int = 1000) -> Diffusion:
    cfg = DiffusionConfig(timesteps=timesteps, prediction=prediction, base_channels=4, channel_mult=[1],
                          num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    model = Diffusion(cfg, OptimConfig(), DataSpec(shape=(1, 2, 2), num_classes=0, levels=256))
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 2, 2, generator=g, dtype=DT) * 0.2
    s = torch.rand(1, 2, 2, generator=g, dtype=DT) * 0.2 + 0.15
    model.net = OptimalNet(model.schedule, mu, s, prediction)
    return model.eval()


def gaussian_data(model: Diffusion, n: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return unit_to_images(model.net.mu + model.net.s * torch.randn(n, 1, 2, 2, generator=g, dtype=DT))


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [10, 1000])
def test_continuous_schedule_interpolates_alpha_bar_with_a_positive_rate(name: str, timesteps: int) -> None:
    schedule = NoiseSchedule.named(name, timesteps)
    knots = torch.arange(timesteps, dtype=DT)
    value, _ = continuous_log_alpha_bar(schedule, knots)
    torch.testing.assert_close(value.exp(), schedule.array("alphas_cumprod"), rtol=1e-12, atol=0)
    tau = torch.linspace(0, timesteps - 1, 20 * timesteps + 1, dtype=DT)
    value, slope = continuous_log_alpha_bar(schedule, tau)
    assert (slope < 0).all()  # beta(s) = -(T-1) slope > 0: a valid VP-SDE
    h = 1e-6
    inner = tau[(tau > h) & (tau < timesteps - 1 - h)]
    def log_ab(tau: Tensor) -> Tensor:
        return continuous_log_alpha_bar(schedule, tau)[0]

    numeric = (log_ab(inner + h) - log_ab(inner - h)) / (2 * h)
    torch.testing.assert_close(continuous_log_alpha_bar(schedule, inner)[1], numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_probability_flow_log_density_of_gaussian_data_is_the_closed_form(prediction: str) -> None:
    model = gaussian_ddpm(prediction)
    mu, s = model.net.mu.detach(), model.net.s.detach()
    x = gaussian_data(model, 32)
    y = dequantize(x, 256, torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=DT))
    got = ode_log_prob(lambda x, t: model.velocity(x, t), y, rtol=1e-7, atol=1e-7)
    ab = model.schedule.array("alphas_cumprod")
    (a0, ab0), (aT, abT) = (ab[0].sqrt(), ab[0]), (ab[-1].sqrt(), ab[-1])
    sd0, sdT = (ab0 * s**2 + 1 - ab0).sqrt(), (abT * s**2 + 1 - abT).sqrt()
    normal = torch.distributions.Normal
    data_end = normal(a0 * mu, sd0).log_prob(y).flatten(1).sum(1)
    x_T = (y - a0 * mu) / sd0 * sdT + aT * mu  # where the exact flow takes y
    prior_error = (normal(0.0, 1.0).log_prob(x_T) - normal(aT * mu, sdT).log_prob(x_T)).flatten(1).sum(1)
    torch.testing.assert_close(got, data_end + prior_error, rtol=0, atol=1e-4)
    assert float(prior_error.abs().max()) < 0.05  # alpha-bar_T = 4e-5: N(0, I) is nearly the last marginal


def test_ddpm_ode_bpd_is_the_true_nll_and_sits_under_the_vlb(tmp_path: Path) -> None:
    """Through the runner (bpd and bpd_ode on the same 400 examples, default tolerances 1e-5): bpd_ode is the
    discrete NLL of the data under the model's density at timestep 1 (a Gaussian, so the bins' probabilities
    are Phi differences) within 0.02 bpd (the dequantization's Jensen gap here is below 1e-3 bpd; the rest is
    Monte-Carlo error, s.e. about 0.003), and the VLB, an upper bound on the NLL of the DDPM's own discrete
    model, lies above it by less than 0.3 bpd: with the reverse variances fixed at beta_t the bound is not
    tight even for the exact predictor (measured 0.18 bpd, s.e. 0.06, for this model)."""
    model = gaussian_ddpm("eps")
    n = 400
    x = gaussian_data(model, n)
    data = EvalData.from_arrays("gauss", model.data_spec, {"test": (x, torch.zeros(n, dtype=torch.long))})
    cfg = EvalConfig(batch_size=200, ode_max_examples=None)
    res = evaluate(model, cfg, data, tmp_path, metrics="bpd,bpd_ode")
    ode, vlb = res["metrics"]["bpd_ode"], res["metrics"]["bpd"]
    assert ode["divergence"] == "exact" and ode["count"] == n and ode["rtol"] == 1e-5
    assert ode["quantity"].startswith("ODE (exact divergence), uniform dequantization, dopri5, rtol 1e-05")

    ab0 = model.schedule.array("alphas_cumprod")[0]
    density = torch.distributions.Normal(ab0.sqrt() * model.net.mu.detach(),
                                         (ab0 * model.net.s.detach() ** 2 + 1 - ab0).sqrt())
    c, w = images_to_unit(x).double(), 2 / 255
    true_bpd = float(-torch.log(density.cdf(c + w / 2) - density.cdf(c - w / 2)).flatten(1).sum(1).mean()) / (
        4 * math.log(2))
    assert abs(ode["value"] - true_bpd) < 0.02, (ode["value"], true_bpd)
    assert -3 * vlb["sem"] < vlb["value"] - ode["value"] < 0.3, (vlb["value"], ode["value"])


def test_bpd_ode_is_a_metric_of_velocity_families_only(tmp_path: Path) -> None:
    model = gaussian_ddpm("eps", timesteps=10)
    assert "bpd_ode" in parse_metrics([], model)
    toy = make_model(FactorizedCategorical)
    assert "bpd_ode" not in parse_metrics([], toy)
    data = EvalData.from_arrays("u", toy.data_spec, {"test": (torch.zeros(4, *toy.data_spec.shape, dtype=torch.uint8),
                                                              torch.zeros(4, dtype=torch.long))})
    res = evaluate(toy, EvalConfig(), data, None, metrics="bpd_ode")
    assert "no velocity field" in res["skipped"]["bpd_ode"]


def test_scalegen_eval_of_a_ddpm_checkpoint_reports_bpd_ode(tmp_path: Path, train_recipe) -> None:
    """The tiny DDPM recipe trained for a few steps; `scalegen eval --metrics bpd,bpd_ode` writes bpd_ode
    (Hutchinson: D = 64 > ode_exact_max_dims) beside the VLB's bpd in metrics.json and report.md."""
    run = train_recipe("ddpm/tiny", tmp_path / "run", "trainer.max_steps=3")
    out = tmp_path / "eval"
    args = ["eval", str(run), "--out", str(out), "--no-wandb", "--metrics", "bpd,bpd_ode", "eval.max_examples=8",
            "eval.ode_probes=2", "eval.ode_rtol=1e-3", "eval.ode_atol=1e-3"]
    assert main(args) == 0
    saved = json.loads((out / "metrics.json").read_text())
    ode = saved["metrics"]["bpd_ode"]
    assert ode["quantity"].startswith("ODE (Hutchinson, 2 Rademacher probes), uniform dequantization")
    assert ode["divergence"] == "hutchinson" and ode["probes"] == 2 and ode["count"] == 8 and ode["dims"] == 64
    assert math.isfinite(ode["value"]) and ode["value"] > 0 and saved["summary"]["eval/bpd_ode"] == ode["value"]
    report = (out / "report.md").read_text()
    assert "| bpd_ode |" in report and "ODE (Hutchinson, 2 Rademacher probes)" in report
    assert "| bpd |" in report


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    sys.path.insert(0, str(HERE))
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = gaussian_ddpm("eps", timesteps=100)
        data = EvalData.from_arrays("g", model.data_spec, {"test": (gaussian_data(model, 13), torch.zeros(13).long())})
        cfg = EvalConfig(batch_size=4, ode_max_examples=None, ode_divergence="hutchinson", ode_probes=2,
                     ode_method="heun", ode_steps=20)
        res = evaluate(model, cfg, data, None, metrics="bpd_ode")
        torch.save(res["metrics"]["bpd_ode"], f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_bpd_ode_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """13 examples in batches of 4 split over a real 2-process gloo group: every example keeps its own
    dequantization noise and probes (seeded by its index), so with a fixed-step solver the result is one
    process's up to round-off (an adaptive solver chooses its steps per batch, and the batches differ)."""
    model = gaussian_ddpm("eps", timesteps=100)
    data = EvalData.from_arrays("g", model.data_spec, {"test": (gaussian_data(model, 13), torch.zeros(13).long())})
    cfg = EvalConfig(batch_size=4, ode_max_examples=None, ode_divergence="hutchinson", ode_probes=2,
                     ode_method="heun", ode_steps=20)
    want = evaluate(model, cfg, data, None, metrics="bpd_ode")["metrics"]["bpd_ode"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["count"] == 13 and got["quantity"] == want["quantity"]
        assert got["value"] == pytest.approx(want["value"], abs=1e-10)
        assert got["sem"] == pytest.approx(want["sem"], abs=1e-10)
