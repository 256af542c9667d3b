"""Flow matching family (scalegen/families/flow_matching.py): a real Lightning run whose loss falls, each
sampler through the family's own `sample` with the closed-form velocity of Gaussian images (moments within
Monte-Carlo tolerance), the velocity's autograd derivative against finite differences, class conditioning
and classifier-free guidance, and one-line refusals of bad settings."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from image_data import Images
from torch.utils.data import DataLoader

from scalegen.config import load_config
from scalegen.config.schema import OptimConfig
from scalegen.dataspec import DataSpec, images_to_unit
from scalegen.errors import ConfigError
from scalegen.families.flow_matching import FlowMatching, FlowMatchingConfig

MU, S = 0.1, 0.2  # Gaussian "images": every pixel ~ N(MU, S^2) in [-1, 1] (clipping at 4.5 sigma: negligible)


def _cfg(**over) -> FlowMatchingConfig:
    base = dict(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], dropout=0.0,
                sampler="heun", sample_steps=8, sample_rtol=1e-3, sample_atol=1e-3)
    return FlowMatchingConfig(**{**base, **over})


def _digits(n: int) -> torch.Tensor:
    """The first n scikit-learn digits as the data pipeline stores them (uint8, round(v * 255 / 16))."""
    from sklearn.datasets import load_digits

    return torch.from_numpy(np.round(load_digits().images[:n] * 255 / 16).astype(np.uint8))[:, None]


def _randomize(model: torch.nn.Module) -> None:
    """Replace the zero-initialised output layers so the velocity depends on every input."""
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)


class GaussianImages(FlowMatching):
    """The family with its network replaced by the exact marginal velocity of N(MU, S^2) pixels
    (sigma_min = 0): v(x, t) = MU + b(t) (x - t MU), b(t) = (t S^2 - (1 - t)) / (t^2 S^2 + (1 - t)^2)."""

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = t.reshape(-1, 1, 1, 1)
        b = (t * S**2 - (1 - t)) / (t**2 * S**2 + (1 - t) ** 2)
        return MU + b * (x - t * MU)


@pytest.mark.parametrize("sampler,steps", [("euler", 100), ("heun", 25), ("adaptive", 1)])
def test_each_sampler_turns_noise_into_the_target_distribution(sampler: str, steps: int) -> None:
    """`sample` integrates the field from noise (t = 0) to data (t = 1) and quantizes: with the exact
    field the images' values have mean MU and std S, within 5 standard errors plus an allowance for the
    solver's error (Euler, first order, 100 steps: 0.006; Heun and dopri5: 0.001; the orders are tested in
    tests/objectives/test_flow_matching_paths.py) and for the 8-bit grid's rounding."""
    n = 2000
    model = GaussianImages(_cfg(sampler=sampler, sample_steps=steps, sample_rtol=1e-6, sample_atol=1e-6),
                           OptimConfig(), DataSpec(shape=(1, 4, 4)))
    torch.manual_seed(1)
    images = model.sample(n)
    assert images.shape == (n, 1, 4, 4) and images.dtype == torch.uint8
    values = images_to_unit(images).double().flatten()
    bias = (0.006 if sampler == "euler" else 1e-3) + 1 / 255  # solver error, half a grid step
    assert abs(values.mean().item() - MU) < 5 * S / math.sqrt(len(values)) + bias
    assert abs(values.std().item() - S) < 5 * S / math.sqrt(2 * len(values)) + bias


def test_family_trains_with_lightning_and_its_loss_falls() -> None:
    images = _digits(256)
    torch.manual_seed(0)
    model = FlowMatching(_cfg(time_sampling="logit_normal"), OptimConfig(lr=2e-3), DataSpec(shape=(1, 8, 8)))
    batch = {"x": images[:64], "y": torch.arange(64) % 10}

    def held_out_loss() -> torch.Tensor:  # the same t and x0 draws before and after training
        torch.manual_seed(123)
        with torch.no_grad():
            return torch.stack([model.loss(batch)[0] for _ in range(4)]).mean()

    before = held_out_loss()
    # The zero-initialised output predicts v = 0: the loss is E|u|^2 = E|x1|^2 + 1 per dimension.
    assert before.item() == pytest.approx(1 + images_to_unit(images[:64]).pow(2).mean().item(), rel=0.05)
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    data = Images(images)
    trainer.fit(model, DataLoader(data, batch_size=32, shuffle=True), DataLoader(data, batch_size=64))
    assert math.isfinite(trainer.callback_metrics["val/loss"].item())
    after = held_out_loss()
    assert after < 0.8 * before, (before, after)
    for sampler in ("euler", "heun", "adaptive"):
        model.cfg.sampler = sampler
        samples = model.sample(3)
        assert samples.shape == (3, 1, 8, 8) and samples.dtype == torch.uint8


def test_velocity_is_differentiable_in_x() -> None:
    """The autograd vector-Jacobian product of `velocity` matches central finite differences (float64),
    so the ODE likelihood can take its divergence by autograd."""
    model = FlowMatching(_cfg(), OptimConfig(), DataSpec(shape=(1, 8, 8))).double().eval()
    _randomize(model)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    w, d = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randn(2, 1, 8, 8, generator=gen,
                                                                                    dtype=torch.float64)
    (grad,) = torch.autograd.grad((model.velocity(x, t) * w).sum(), x)
    eps = 1e-6
    with torch.no_grad():
        fd = ((model.velocity(x + eps * d, t) - model.velocity(x - eps * d, t)) * w).sum() / (2 * eps)
    assert abs(fd.item()) > 1e-3
    assert (grad * d).sum().item() == pytest.approx(fd.item(), rel=1e-6)


def test_class_conditioning_and_guidance() -> None:
    spec = DataSpec(shape=(1, 8, 8), num_classes=10)
    model = FlowMatching(_cfg(class_conditional=True, label_dropout=0.5, guidance_scale=2.0), OptimConfig(), spec)
    assert model.num_labels == 10 and FlowMatching(_cfg(), OptimConfig(), spec).num_labels == 0
    _randomize(model)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 0.7])
    v = model.velocity(x, t, torch.tensor([1, 2]))
    assert (v - model.velocity(x, t, torch.tensor([3, 4]))).abs().min() > 0  # the labels are seen
    torch.testing.assert_close(model.velocity(x, t, torch.tensor([-1, -1])), model.velocity(x, t))  # -1 = none
    torch.testing.assert_close(model.guided_velocity(x, t, torch.tensor([1, 2])), 2 * v - model.velocity(x, t))
    # Training reaches the embeddings of the batch's labels and, through label dropout, the "none" row.
    images = _digits(64)
    torch.manual_seed(0)
    loss, _ = model.loss({"x": images, "y": torch.full((64,), 3)})
    loss.backward()
    used = model.net.label_emb.weight.grad.abs().sum(1) > 0
    assert used.tolist() == [k in (3, 10) for k in range(11)]
    samples = model.sample(4, torch.tensor([0, 1, 2, 3]))
    assert samples.shape == (4, 1, 8, 8) and samples.dtype == torch.uint8


def test_bad_settings_are_one_line_config_errors() -> None:
    for override, names in (("model.sampler=rk4", "euler, heun, adaptive"),
                            ("model.time_sampling=beta", "uniform, logit_normal")):
        with pytest.raises(ConfigError, match=f"not allowed; choose one of {names}") as err:
            load_config("flow_matching/tiny", [override])
        assert "\n" not in str(err.value)
    spec = DataSpec(shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ConfigError, match="^model.label_dropout and model.guidance_scale .* need model.class_cond"):
        FlowMatching(_cfg(guidance_scale=3.0), OptimConfig(), spec)
    with pytest.raises(ConfigError, match="^model.guidance_scale != 1 needs model.label_dropout > 0"):
        FlowMatching(_cfg(class_conditional=True, guidance_scale=3.0), OptimConfig(), spec)
