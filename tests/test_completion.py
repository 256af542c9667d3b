"""Completion / inpainting: observed pixels kept, the PixelCNN's completions of the bottom half against
the exact conditional from enumerating its joint, RePaint against a closed-form denoiser, the CLI."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from scalegen.config.schema import OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.families.diffusion import Diffusion, DiffusionConfig
from scalegen.families.pixelcnn import PixelCNNConfig, PixelCNNModel
from scalegen.families.vae import VAE, VAEConfig
from scalegen.objectives.diffusion import NoiseSchedule
from scalegen.samplers.completion import complete_diffusion, is_raster_suffix
from scalegen.samplers.diffusion import ddpm_sample


def _bottom(h: int, w: int) -> torch.Tensor:
    mask = torch.ones(1, 1, h, w, dtype=torch.bool)
    mask[..., h // 2:, :] = False
    return mask


def _tiny_pixelcnn(shape=(1, 2, 3)) -> PixelCNNModel:
    cfg = PixelCNNConfig(output="binary", hidden_channels=16, num_layers=2, kernel_size=3, first_kernel_size=3,
                         out_hidden_channels=32)
    return PixelCNNModel(cfg, OptimConfig(), DataSpec(shape=shape, num_classes=0))


def _train_on_correlated_rows(model: PixelCNNModel, steps: int = 150) -> None:
    """Bottom row = top row with each bit flipped w.p. 0.15, top bits ~ Bernoulli(0.7): p(bottom | top)
    then depends strongly on the top row (the check below has something to distinguish)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        top = (torch.rand(256, 3) < 0.7).long()
        bottom = top ^ (torch.rand(256, 3) < 0.15).long()
        x = (torch.stack([top, bottom], 1)[:, None] * 255).to(torch.uint8)
        loss, _ = model.loss({"x": x})
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _all_binary_images(h: int, w: int) -> torch.Tensor:
    bits = torch.tensor(list(itertools.product([0, 1], repeat=h * w)), dtype=torch.uint8)
    return (bits * 255).view(-1, 1, h, w)


@pytest.mark.parametrize("top", [(1, 0, 1), (0, 0, 1)])
def test_pixelcnn_bottom_half_follows_the_exact_conditional(top) -> None:
    """Completions of the bottom row of a 2x3 binary PixelCNN against p(bottom | top) = p(x) / sum over
    bottoms, p(x) from the model's exact NLL of each of the 64 images. 20,000 draws over 8 outcomes:
    total variation < 0.02 (its sampling noise is ~0.005) and a chi-square p-value > 1e-4. The same
    draws are far (TV > 0.1) from the bottom row's marginal, so the check can tell them apart."""
    model = _tiny_pixelcnn()
    _train_on_correlated_rows(model)
    images = _all_binary_images(2, 3)
    with torch.no_grad():
        logp = -model.nll(images).double()
    tops = images[:, 0, 0] // 255
    bottoms = images[:, 0, 1] // 255
    code = lambda b: (b[..., 0] * 4 + b[..., 1] * 2 + b[..., 2]).long()  # noqa: E731
    rows = (tops == torch.tensor(top, dtype=torch.uint8)).all(1)
    exact = torch.zeros(8, dtype=torch.float64)
    exact[code(bottoms[rows])] = torch.softmax(logp[rows], 0)
    marginal = torch.zeros(8, dtype=torch.float64).index_add_(0, code(bottoms), logp.exp())
    assert exact.max() > 0.3  # a peaked conditional, not the near-uniform one of an untrained net

    x = images[rows][:1]
    torch.manual_seed(1)
    n = 20000
    out = model.complete(x.expand(n, 1, 2, 3), _bottom(2, 3))
    assert out.shape == (n, 1, 2, 3) and out.dtype == torch.uint8
    assert torch.equal(out[:, :, 0], x[:, :, 0].expand(n, 1, 3))  # the observed row comes back unchanged
    counts = torch.bincount(code(out[:, 0, 1].long() // 255), minlength=8).double()
    freq = counts / n
    tv = 0.5 * (freq - exact).abs().sum().item()
    assert tv < 0.02, (freq, exact)
    assert chisquare(counts.numpy(), exact.numpy() * n).pvalue > 1e-4
    assert 0.5 * (freq - marginal).abs().sum().item() > 0.1


def test_raster_suffix_masks_are_recognised() -> None:
    assert is_raster_suffix(_bottom(4, 4))
    right = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    right[..., 2:] = False
    assert not is_raster_suffix(right)  # missing pixels of row 0 come before observed ones of row 1


def test_pixelcnn_keeps_observed_pixels_for_any_mask() -> None:
    model = _tiny_pixelcnn((1, 4, 4)).eval()
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    mask = torch.rand(3, 1, 4, 4) < 0.5
    out = model.complete(x, mask)
    assert out.shape == x.shape
    keep = mask.expand_as(out)
    assert torch.equal(out[keep], x[keep])  # exact 8-bit values, not binarized
    assert set(out[~keep].unique().tolist()) <= {0, 255}  # a binary model draws binary pixels


class TwoPointDenoiser(torch.nn.Module):
    """The exact eps-prediction for data x_0 = +v or -v (v = all ones, equal odds):
    E[x_0 | x_t] = v tanh(sqrt(a) <x_t, v> / (1 - a)), a = alpha-bar_t."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.ac = schedule.array("alphas_cumprod")

    def forward(self, x: torch.Tensor, i: torch.Tensor, y=None) -> torch.Tensor:
        a = self.ac[i].to(x.dtype).view(-1, 1, 1, 1)
        s = x.flatten(1).sum(1).view(-1, 1, 1, 1)
        x0 = torch.tanh(a.sqrt() * s / (1 - a)).expand_as(x)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


@pytest.mark.parametrize("resample", [1, 3])
def test_repaint_completes_a_two_point_distribution_from_its_known_half(resample: int) -> None:
    """Data is all +1 or all -1. Given a known left half of +1, every inpainting must be +1 (the exact
    conditional); the same net sampled unconditionally gives each sign about half the time."""
    schedule = NoiseSchedule.named("linear", 50)
    net = TwoPointDenoiser(schedule)
    torch.manual_seed(0)
    n = 200
    observed = torch.ones(n, 1, 4, 4, dtype=torch.float64)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 2:] = False
    out = complete_diffusion(net, schedule, observed, mask, resample=resample)
    assert torch.equal(out[..., :2], observed[..., :2])
    assert (out[..., 2:].flatten(1).mean(1) > 0.9).all()
    free = ddpm_sample(net, schedule, torch.randn(n, 1, 4, 4, dtype=torch.float64))
    positive = (free.flatten(1).mean(1) > 0).double().mean().item()
    assert 0.35 < positive < 0.65, positive


def test_diffusion_and_vae_keep_observed_pixels() -> None:
    torch.manual_seed(0)
    spec = DataSpec(shape=(1, 8, 8), num_classes=10)
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    mask = _bottom(8, 8)
    diff = Diffusion(DiffusionConfig(timesteps=10, base_channels=8, channel_mult=[1], num_res_blocks=1,
                                     attn_resolutions=[], dropout=0.0, repaint_resample=2),
                     OptimConfig(), spec).eval()
    vae = VAE(VAEConfig(hidden=[32], latent_dim=4, likelihood="logistic", complete_steps=3), OptimConfig(),
              spec).eval()
    for model in (diff, vae):
        out = model.complete(x, mask)
        assert out.shape == (2, 1, 8, 8) and out.dtype == torch.uint8
        assert torch.equal(out[..., :4, :], x[..., :4, :]), type(model).__name__
        assert not torch.equal(out[..., 4:, :], x[..., 4:, :])


def test_latent_chain_is_iterated_encode_decode_with_clamping() -> None:
    """complete_latent's chain, checked against its definition with a deterministic encode/decode pair:
    x_1 = paste(observed, decode(encode(x_0))), x_0 = paste(observed, fill), and so on."""
    from scalegen.samplers.completion import complete_latent

    observed = torch.rand(4, 1, 3, 3)
    mask = torch.rand(4, 1, 3, 3) < 0.5
    encode = lambda v: v.flatten(1) * 2  # noqa: E731
    decode = lambda z: (z.view(-1, 1, 3, 3) / 2) ** 2  # noqa: E731
    x0 = torch.where(mask, observed, torch.full_like(observed, 0.5))
    x1 = torch.where(mask, observed, x0**2)
    torch.testing.assert_close(complete_latent(encode, decode, observed, mask, steps=1, fill=0.5), x1)
    torch.testing.assert_close(complete_latent(encode, decode, observed, mask, steps=2, fill=0.5),
                               torch.where(mask, observed, x1**2))


def test_langevin_completion_samples_the_gaussian_conditional() -> None:
    """E(x) = x^T P x / 2 on 4 values (P a fixed precision matrix), values 2 and 3 missing: the conditional
    is Gaussian with precision P_mm and mean -P_mm^-1 P_mo x_o. 4,000 chains of unadjusted Langevin
    (noise sqrt(step), step 0.02, 2,000 steps: the slowest direction, eigenvalue 0.48, has forgotten the
    start to 1e-4): mean within 0.05 and covariance within 0.06 of the closed form (the discretisation bias
    of the covariance at this step is ~1.5 %, the Monte-Carlo error of the mean ~0.02); observed values exact."""
    from scalegen.samplers.completion import complete_langevin

    torch.manual_seed(0)
    a = torch.tensor([[2.0, 0.5, 0.3, 0.0], [0.5, 1.5, 0.0, 0.4], [0.3, 0.0, 1.2, 0.5], [0.0, 0.4, 0.5, 1.0]])
    precision = a @ a.T
    energy = lambda x: 0.5 * torch.einsum("bi,ij,bj->b", x.flatten(1), precision, x.flatten(1))
    x_obs = torch.tensor([1.0, -0.5, 0.0, 0.0])
    n = 4000
    observed = x_obs.expand(n, 4).reshape(n, 1, 2, 2).clone()
    mask = torch.tensor([True, True, False, False]).view(1, 1, 2, 2)
    out = complete_langevin(energy, observed, mask, torch.zeros_like(observed), steps=2000, step_size=0.02)
    flat = out.flatten(1)
    assert torch.equal(flat[:, :2], observed.flatten(1)[:, :2])
    p_mm, p_mo = precision[2:, 2:], precision[2:, :2]
    cov = torch.linalg.inv(p_mm)
    mean = -(cov @ p_mo @ x_obs[:2])
    torch.testing.assert_close(flat[:, 2:].mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(flat[:, 2:].T), cov, atol=0.06, rtol=0)


@pytest.mark.parametrize("family", ["ebm", "jem"])
def test_energy_models_keep_observed_pixels(family: str) -> None:
    from scalegen.families.ebm import EBM, EBMConfig
    from scalegen.families.jem import JEM, JEMConfig

    cls, cfg = (EBM, EBMConfig) if family == "ebm" else (JEM, JEMConfig)
    model = cls(cfg(widths=[8, 8], sample_steps=5), OptimConfig(), DataSpec(shape=(1, 8, 8), num_classes=10))
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    mask = _bottom(8, 8)
    out = model.complete(x, mask)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out[..., :4, :], x[..., :4, :])
    assert not torch.equal(out[..., 4:, :], x[..., 4:, :])
