"""LAPGAN: the Laplacian pyramid's exact inverses, generated images whose pyramid is the generator's own
levels, joint training of every level, the recipes' pyramids, the tiny recipe through train, eval and
`scalegen sample --levels`."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from image_data import Images
from PIL import Image
from torch.utils.data import DataLoader

from scalegen.cli.main import main
from scalegen.config import load_config
from scalegen.config.schema import OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.families.lapgan import LAPGAN, LAPGANConfig
from scalegen.nets.pyramid import band, decompose, down, reconstruct, up


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_decomposition_and_reconstruction_are_exact_inverses(levels: int) -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 2, 16, 24, dtype=torch.float64) * 2 - 1
    coarse, residuals = decompose(x, levels)
    assert coarse.shape == (3, 2, 16 >> (levels - 1), 24 >> (levels - 1)) and len(residuals) == levels - 1
    torch.testing.assert_close(reconstruct(coarse, residuals), x, rtol=0, atol=1e-14)
    # ... and the other way round for any coarse image and band-pass residuals.
    c = torch.randn_like(coarse)
    hs = [band(torch.randn_like(h)) for h in residuals]
    c2, hs2 = decompose(reconstruct(c, hs), levels)
    torch.testing.assert_close(c2, c, rtol=0, atol=1e-14)
    for h, h2 in zip(hs, hs2):
        torch.testing.assert_close(h2, h, rtol=0, atol=1e-14)


def test_pyramid_operators_against_their_definitions() -> None:
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    torch.testing.assert_close(down(x), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]], dtype=torch.float64))
    torch.testing.assert_close(up(down(x))[0, 0, :2, :2], torch.full((2, 2), 2.5, dtype=torch.float64))
    torch.testing.assert_close(down(band(x)), torch.zeros(1, 1, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="even sizes"):
        down(torch.zeros(1, 1, 3, 4))


def _model(**over) -> LAPGAN:
    cfg = LAPGANConfig(**{**dict(levels=3, min_resolution=2, latent_dim=8, g_channels=8, d_channels=8,
                                 level_channels=8), **over})
    return LAPGAN(cfg, OptimConfig(name="adam", lr=1e-3, betas=[0.5, 0.999]), DataSpec(shape=(1, 16, 16)))


def test_generated_pyramid_is_the_generators_levels() -> None:
    """Each level's residual is band-pass, so decomposing a generated image gives back the coarse sample
    and every level's image exactly: sampling coarse to fine is the inverse of the discriminators' view."""
    torch.manual_seed(0)
    model = _model().eval()
    with torch.no_grad():
        levels = model.generator.levels(torch.randn(4, 8))
    assert [x.shape[-1] for x in levels] == [4, 8, 16]
    coarse, residuals = decompose(levels[-1], 3)
    torch.testing.assert_close(coarse, levels[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(reconstruct(coarse, residuals[:1]), levels[1], rtol=0, atol=1e-6)
    assert model.discriminator(levels[-1]).shape == (4, 3)  # one logit per level
    images = model.sample_levels(2)
    assert [tuple(x.shape) for x in images] == [(2, 1, 4, 4), (2, 1, 8, 8), (2, 1, 16, 16)]
    assert all(x.dtype == torch.uint8 for x in images)


def test_every_level_trains_in_every_step() -> None:
    """One D step and one G step (d_steps = 1) move every level's generator and discriminator."""
    torch.manual_seed(0)
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, DataLoader(Images(x), batch_size=16))
    for prefix in ("generator.coarse", "generator.refine.0", "generator.refine.1", "discriminator.coarse",
                   "discriminator.refine.0", "discriminator.refine.1"):
        moved = [n for n, p in model.named_parameters() if n.startswith(prefix) and not torch.equal(p, before[n])]
        assert moved, f"{prefix} did not move"


@pytest.mark.parametrize("recipe,shape,sizes", [("lapgan/mnist", (1, 28, 28), [14, 28]),
                                                ("lapgan/cifar10", (3, 32, 32), [8, 16, 32])])
def test_recipe_pyramids(recipe: str, shape, sizes) -> None:
    cfg = load_config(recipe)
    model = LAPGAN(cfg.model, cfg.optim, DataSpec(shape=shape)).eval()
    assert [x.shape[-1] for x in model.sample_levels(2)] == sizes


def test_bad_pyramid_is_a_config_error() -> None:
    from scalegen.errors import ConfigError

    with pytest.raises(ConfigError, match="too small for model.min_resolution=2"):
        _model(levels=4, min_resolution=2)  # a 2x2 coarse level
    with pytest.raises(ConfigError, match="must halve 5 times"):
        _model(levels=6)


def test_tiny_recipe_trains_evaluates_and_draws_its_levels(train_recipe, tmp_path: Path) -> None:
    run = train_recipe("lapgan/tiny", tmp_path / "run")
    out = tmp_path / "levels.png"
    assert main(["sample", str(run), "--levels", "--n", "6", "--out", str(out)]) == 0
    w, h = 6 * 9 + 1, 2 * 9 + 1  # 6 samples a row, 2 levels, 8x8 cells with 1-pixel borders
    scale = 256 // w
    assert Image.open(out).size == (w * scale, h * scale)
    assert main(["eval", str(run), "--out", str(tmp_path / "eval"), "--no-wandb", "--num-samples", "64",
                 "--metrics", "fid", "eval.reference_examples=256"]) == 0
    assert (tmp_path / "eval" / "metrics.json").is_file()
