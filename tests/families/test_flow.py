"""Normalizing flows: invertibility, log-determinants against autograd, and likelihood on toy data."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits, make_moons
from torch.autograd.functional import jacobian

from scalegen.config.schema import OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.families.flow import FlowConfig, FlowModel
from scalegen.nets.flows import (
    ActNorm,
    AffineCoupling,
    InvConv1x1,
    LogitTransform,
    MultiScaleFlow,
    Shift,
    Squeeze,
    VectorFlow,
    glow,
    realnvp,
)
from scalegen.objectives.flow import flow_nll, uniform_dequantize


def _perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter off its (identity) initialization so the checks are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _autograd_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn at each example of x (batch of independent examples), by full autograd Jacobians."""
    out = []
    for xi in x:
        def flat(v, xi=xi):
            y = fn(v.view(1, *xi.shape))
            y = torch.cat([t.reshape(1, -1) for t in y], 1) if isinstance(y, list) else y.reshape(1, -1)
            return y[0]
        jac = jacobian(flat, xi.reshape(-1))
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


IMAGE_LAYERS = {
    "logit": lambda: LogitTransform(0.05),
    "shift": lambda: Shift(),
    "squeeze": lambda: Squeeze(),
    "actnorm": lambda: ActNorm(4),
    "invconv_lu": lambda: InvConv1x1(4, lu=True),
    "invconv_full": lambda: InvConv1x1(4, lu=False),
    "coupling_checker_tanh_0": lambda: AffineCoupling(4, "checkerboard", 0, 8, 1, "tanh"),
    "coupling_checker_tanh_1": lambda: AffineCoupling(4, "checkerboard", 1, 8, 1, "tanh"),
    "coupling_channel_tanh_0": lambda: AffineCoupling(4, "channel", 0, 8, 1, "tanh"),
    "coupling_channel_sigmoid_1": lambda: AffineCoupling(4, "channel", 1, 8, 0, "sigmoid"),
    "coupling_channel_additive": lambda: AffineCoupling(4, "channel", 0, 8, 0, "none"),
}


@pytest.mark.parametrize("name", sorted(IMAGE_LAYERS))
def test_image_layer_logdet_matches_autograd_and_inverts(name):
    torch.manual_seed(0)
    layer = IMAGE_LAYERS[name]().double()
    x = torch.rand(3, 4, 4, 4, dtype=torch.float64) * 0.9 + 0.05
    layer.train()
    layer(x)  # ActNorm's data-dependent initialization happens here
    _perturb(layer)
    layer.eval()
    z, logdet = layer(x)
    expected = _autograd_logdet(lambda v: layer(v)[0], x)
    torch.testing.assert_close(logdet, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.inverse(z), x, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("mask", ["checkerboard", "channel"])
def test_vector_layers_logdet_and_inverse(mask):
    torch.manual_seed(0)
    layers = [AffineCoupling(4, mask, p, 8, 1, s, vector=True) for p in (0, 1) for s in ("tanh", "sigmoid")]
    layers += [ActNorm(4), InvConv1x1(4)]
    x = torch.randn(3, 4, dtype=torch.float64)
    for layer in layers:
        layer = layer.double().train()
        layer(x)
        _perturb(layer)
        layer.eval()
        z, logdet = layer(x)
        expected = _autograd_logdet(lambda v, la=layer: la(v)[0], x)
        torch.testing.assert_close(logdet, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.inverse(z), x, rtol=1e-7, atol=1e-7)


def _small_flows() -> dict[str, MultiScaleFlow]:
    return {
        "realnvp": realnvp((2, 4, 4), num_scales=2, hidden=8, num_blocks=1, actnorm=True),
        "glow": glow((2, 4, 4), num_levels=2, steps_per_level=2, hidden=8, lu=True),
        "glow_additive_full": glow((2, 4, 4), num_levels=2, steps_per_level=2, hidden=8, lu=False,
                                   coupling="additive", learned_prior=False),
    }


@pytest.mark.parametrize("name", ["realnvp", "glow", "glow_additive_full"])
def test_multiscale_flow_logdet_inverse_and_density(name):
    """Whole multi-scale flows: x -> (all latents) has log|det J| = summed layer log-dets; inverse exact."""
    torch.manual_seed(1)
    flow = _small_flows()[name].double()
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64) * 0.9 + 0.05
    flow.train()
    flow(x)
    _perturb(flow, 0.05)
    flow.eval()
    zs, logdet, logp = flow(x)
    torch.testing.assert_close(logdet, _autograd_logdet(lambda v: flow(v)[0], x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flow.inverse(zs), x, rtol=1e-7, atol=1e-7)
    assert torch.isfinite(logp).all()
    if name == "glow_additive_full":  # standard-normal priors everywhere: log p = sum log N(z; 0, 1)
        allz = torch.cat([z.reshape(2, -1) for z in zs], 1)
        expected = -0.5 * (allz**2 + math.log(2 * math.pi)).sum(1)
        torch.testing.assert_close(logp, expected)


def test_float32_roundtrip_default_sizes():
    """Realistic depth in float32: inverse(forward(x)) == x to float tolerance."""
    torch.manual_seed(0)
    for flow in (realnvp((1, 8, 8), 2, 16, 2), glow((3, 8, 8), 2, 4, 16)):
        x = torch.rand(4, *flow.input_shape)
        flow.train()
        flow(x)
        _perturb(flow, 0.02)
        flow.eval()
        zs, _, _ = flow(x)
        torch.testing.assert_close(flow.inverse(zs), x, rtol=1e-4, atol=1e-4)


def test_flow_nll_is_density_plus_dequantization_offset():
    torch.manual_seed(0)
    flow = glow((1, 4, 4), 1, 2, 8).eval()
    x = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    nll = flow_nll(flow.log_prob, x, generator=torch.Generator().manual_seed(3))
    u = uniform_dequantize(x, generator=torch.Generator().manual_seed(3))
    assert ((u * 256).floor() == x.float()).all() and (u >= 0).all() and (u < 1).all()
    torch.testing.assert_close(nll, -flow.log_prob(u) + 16 * math.log(256))


def test_two_moons_flow_beats_fitted_gaussian():
    torch.manual_seed(0)
    train, _ = make_moons(4000, noise=0.05, random_state=0)
    test, _ = make_moons(2000, noise=0.05, random_state=1)
    mean, cov = train.mean(0), np.cov(train.T)
    diff = test - mean
    gauss_nll = float(np.mean(0.5 * np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
                              + 0.5 * np.log(np.linalg.det(2 * np.pi * cov))))
    flow = VectorFlow(2, num_couplings=6, hidden=32, num_blocks=1)
    xtr = torch.tensor(train, dtype=torch.float32)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    flow.train()
    for _ in range(400):
        idx = torch.randint(0, len(xtr), (128,))
        loss = -flow.log_prob(xtr[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flow.eval()
    with torch.no_grad():
        flow_nll_test = float(-flow.log_prob(torch.tensor(test, dtype=torch.float32)).mean())
    # A Gaussian cannot represent two separated crescents; a trained flow gets well under it.
    assert flow_nll_test < gauss_nll - 0.5, (flow_nll_test, gauss_nll)
    samples = flow.sample(2000)
    assert samples.shape == (2000, 2) and torch.isfinite(samples).all()


def _digits_uint8() -> torch.Tensor:
    images = load_digits().images  # 8x8, 17 grey levels 0..16
    return torch.tensor(np.clip(images * 16, 0, 255), dtype=torch.uint8).unsqueeze(1)


@pytest.mark.parametrize("architecture", ["realnvp", "glow"])
def test_family_short_run_lowers_bpd(architecture, tmp_path):
    torch.manual_seed(0)
    cfg = FlowConfig(architecture=architecture, num_scales=2, steps_per_scale=2, hidden_channels=16,
                     num_blocks=1)
    model = FlowModel(cfg, OptimConfig(lr=2e-3), DataSpec(kind="image", shape=(1, 8, 8)))
    x = _digits_uint8()
    batches = [{"x": x[i:i + 64], "y": torch.zeros(64, dtype=torch.long)} for i in range(0, 640, 64)]
    held = x[1000:1256]
    model.train()
    model.loss({"x": held[:64]})  # ActNorm's data-dependent init
    model.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        before = float(model.nll(held).mean())
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None, shuffle=True))
    model.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        after = float(model.nll(held).mean())
    assert after < before - 0.3 * 64 * math.log(2), (before, after)  # at least 0.3 bits/dim better
    samples = model.sample(4)
    assert samples.shape == (4, 1, 8, 8) and samples.dtype == torch.uint8


def test_sampling_temperature():
    torch.manual_seed(0)
    cfg = FlowConfig(architecture="glow", num_scales=2, steps_per_scale=2, hidden_channels=8)
    model = FlowModel(cfg, OptimConfig(), DataSpec(kind="image", shape=(1, 8, 8))).eval()
    _perturb(model.net, 0.05)
    a, b = model.sample(3, temperature=0.0), model.sample(3, temperature=0.0)
    assert torch.equal(a, b)  # T = 0: every latent at its prior mean
    z_cold = torch.cat([z.flatten(1) for z in model.net(model.net.sample(256, 0.5))[0]], 1)
    z_warm = torch.cat([z.flatten(1) for z in model.net(model.net.sample(256, 1.0))[0]], 1)
    ratio = float(z_cold[:, -8:].std() / z_warm[:, -8:].std())  # top latent: N(0, T^2) exactly
    assert 0.4 < ratio < 0.6, ratio


@pytest.mark.parametrize("architecture", ["realnvp", "glow"])
def test_bf16_autocast_loss_matches_float32(architecture):
    """Under bf16 autocast (trainer.precision=bf16-mixed) the loss stays finite and close to fp32."""
    torch.manual_seed(0)
    cfg = FlowConfig(architecture=architecture, num_scales=2, steps_per_scale=2, hidden_channels=16,
                     num_blocks=1)
    model = FlowModel(cfg, OptimConfig(), DataSpec(kind="image", shape=(1, 8, 8)))
    x = _digits_uint8()[:64]
    model.loss({"x": x})  # ActNorm init in float32
    _perturb(model.net, 0.02)
    torch.manual_seed(1)
    ref, _ = model.loss({"x": x})
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = model.loss({"x": x})
    assert low.dtype == torch.float32  # log-dets and log-densities accumulate in float32
    assert abs(float(low) - float(ref)) < 0.05, (float(low), float(ref))
    low.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _actnorm_rank(rank: int, world: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different data on every rank
        layer = ActNorm(3)

        def mean_over_ranks(stats: torch.Tensor) -> torch.Tensor:
            torch.distributed.all_reduce(stats)
            return stats / world

        layer.initialize(torch.randn(16, 3, 4, 4) * (rank + 1) + rank, mean_over_ranks)
        torch.save({"bias": layer.bias.detach(), "log_scale": layer.log_scale.detach()}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # ~40 s on 2 loaded cores: two spawned processes re-import torch and lightning
def test_actnorm_init_is_identical_across_ddp_ranks(tmp_path):
    """Data-dependent init with the statistics averaged over ranks by the caller (the network calls no
    collective): replicas start with the same parameters."""
    import torch.multiprocessing as mp

    mp.spawn(_actnorm_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "p")), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "p.0"), torch.load(tmp_path / "p.1")
    torch.testing.assert_close(a, b)
    # The statistics are those of both ranks' data together: recompute them here.
    data = []
    for rank in (0, 1):
        torch.manual_seed(rank)
        data.append(torch.randn(16, 3, 4, 4) * (rank + 1) + rank)
    x = torch.cat(data)
    torch.testing.assert_close(a["bias"], -x.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a["log_scale"], -torch.log(x.std((0, 2, 3), unbiased=False) + 1e-6),
                               rtol=1e-4, atol=1e-5)
