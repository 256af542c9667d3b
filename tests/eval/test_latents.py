"""Latent exploration: slerp against its closed form, the figures eval writes for a VAE."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from scalegen.config.schema import EvalConfig, OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.eval.data import EvalData
from scalegen.eval.latents import latent_grids, lerp, slerp
from scalegen.eval.runner import evaluate
from scalegen.families.vae import VAE, VAEConfig


def test_slerp_endpoints_norms_and_angles() -> None:
    """Endpoints are the inputs; between two vectors of equal norm the path keeps that norm and the angle
    from a grows linearly in t (a great circle at constant speed)."""
    torch.manual_seed(0)
    a, b = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    b = b / b.norm(dim=1, keepdim=True) * a.norm(dim=1, keepdim=True)
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    path = slerp(a, b, t)
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path.norm(dim=2), a.norm(dim=1).expand(7, 5))
    omega = torch.arccos((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)))
    angle = torch.arccos(((path * a).sum(2) / (path.norm(dim=2) * a.norm(dim=1))).clamp(-1, 1))
    torch.testing.assert_close(angle, t[:, None] * omega, atol=1e-6, rtol=0)
    # Parallel vectors: the straight line (no 0/0).
    torch.testing.assert_close(slerp(a, 2 * a, t)[3], lerp(a, 2 * a, t)[3])


def _vae(latent_dim: int, conditional: bool) -> VAE:
    torch.manual_seed(0)
    cfg = VAEConfig(hidden=[32], latent_dim=latent_dim, conditional=conditional)
    return VAE(cfg, OptimConfig(), DataSpec(shape=(1, 8, 8), num_classes=10)).eval()


def test_interpolation_row_ends_are_the_decoded_encodings() -> None:
    model = _vae(6, conditional=False)
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(8)
    images, nrow = latent_grids(model, x, y)["latent_interpolation"]
    assert nrow == 10 and images.shape == (4 * 10, 1, 8, 8)
    rows = images.view(4, 10, 1, 8, 8)
    assert torch.equal(rows[:, 0], x[:4]) and torch.equal(rows[:, -1], x[4:])  # the originals frame each row
    z = model.encode(x)
    assert torch.equal(rows[:, 1], model.decode_latent(z[:4])) and torch.equal(rows[:, -2], model.decode_latent(z[4:]))


def test_manifold_is_the_decoder_on_the_inverse_normal_cdf_grid() -> None:
    from scipy.stats import norm

    model = _vae(2, conditional=False)
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    images, nrow = latent_grids(model, x, torch.zeros(4, dtype=torch.long))["latent_manifold"]
    g = torch.tensor(norm.ppf(torch.linspace(0.05, 0.95, 15).double().numpy()), dtype=torch.float32)
    row, col = 2, 11  # row r: z2 = g[14 - r] (high z2 at the top); column c: z1 = g[c]
    z = torch.tensor([[g[col], g[14 - row]]])
    assert nrow == 15 and torch.equal(images[row * 15 + col], model.decode_latent(z)[0])


@pytest.mark.parametrize("conditional", [False, True])
def test_eval_writes_latent_figures(tmp_path: Path, conditional: bool) -> None:
    model = _vae(2, conditional)
    g = torch.Generator().manual_seed(0)
    split = lambda n: (torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g),  # noqa: E731
                       torch.arange(n) % 10)
    data = EvalData.from_arrays("noise", model.data_spec, {"train": split(20), "test": split(20)})
    res = evaluate(model, EvalConfig(batch_size=20, iwae_k=1), data, tmp_path, metrics="bpd", log_wandb=False)
    expected = {"latent_interpolation": (4, 10), "latent_manifold": (15, 15)}
    if conditional:
        expected["latent_labels"] = (8, 11)
    assert set(expected) <= set(res["figures"])
    assert ("latent_labels" in res["figures"]) == conditional
    for name, (rows, cols) in expected.items():
        img = Image.open(tmp_path / f"{name}.png")
        img.load()
        # plots.image_grid: 8x8 cells with a 1-pixel border, upscaled by 256 // width (at least 1).
        w, h = cols * 9 + 1, rows * 9 + 1
        scale = max(1, 256 // w)
        assert img.size == (w * scale, h * scale), name
        assert f"{name}.png" in (tmp_path / "report.md").read_text()
    assert math.isfinite(res["metrics"]["bpd"]["value"])
