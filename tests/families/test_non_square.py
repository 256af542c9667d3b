"""Families on non-square images: a folder of 20x24 RGB PNGs packed by `scalegen data pack`, trained from the
tiny recipes. The families with convolutional encoders and decoders (VAE, autoencoder, VQ-VAE) train until
their loss falls, reconstruct 20x24 images, and the VQ-VAE's prior trains over its 5x6 code maps; the other
image families that take any size run a few steps and sample 20x24 images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scalegen.cli.main import main
from scalegen.data import build_datamodule
from scalegen.runtime import load_model

H, W = 20, 24


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Discs and squares of random colour at random places, two class folders, packed into shards."""
    src, rng = tmp_path_factory.mktemp("shapes-src"), np.random.default_rng(0)
    yy, xx = np.mgrid[:H, :W]
    for name in ("disc", "square"):
        (src / name).mkdir()
        for i in range(96):
            cy, cx = rng.integers(6, 14), rng.integers(6, 18)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < 20 if name == "disc" else (abs(yy - cy) < 4) & (abs(xx - cx) < 4)
            img = np.zeros((H, W, 3), np.uint8)
            img[mask] = rng.integers(100, 256, 3)
            Image.fromarray(img).save(src / name / f"{i}.png")
    out = tmp_path_factory.mktemp("shapes")
    assert main(["data", "pack", str(src), "--out", str(out), "--val-fraction", "0.1", "--test-fraction", "0.1"]) == 0
    return out


@pytest.mark.parametrize("recipe, overrides", [
    ("vae/tiny", []),
    ("ae/tiny", ["model.net=conv", "model.hidden=[16,32]"]),
    ("vqvae/tiny", []),
])
def test_conv_family_trains_on_non_square_images(recipe: str, overrides: list[str], shapes: Path, tmp_path: Path,
                                                 train_recipe) -> None:
    run = train_recipe(recipe, tmp_path / "run", f"data.root={shapes}", "trainer.max_epochs=10", "data.batch_size=16",
                       *overrides)
    model, cfg = load_model(run)
    batch = next(iter(build_datamodule(cfg.data).test_dataloader()))
    assert batch["x"].shape[1:] == (3, H, W)
    torch.manual_seed(0)
    fresh = type(model)(cfg.model, cfg.optim, model.data_spec).eval()
    with torch.no_grad():
        torch.manual_seed(1)
        before = fresh.loss(batch)[0].item()
        torch.manual_seed(1)
        after = model.loss(batch)[0].item()
        recon = model.reconstruct(batch["x"][:4], batch["y"][:4])
        if "sample" in model.predictions:
            assert model.sample(4).shape == (4, 3, H, W)
    assert after < 0.6 * before, (before, after)  # it learned (these runs measured 0.20-0.42)
    assert recon.shape == (4, 3, H, W)
    # validation images over their reconstructions: two rows of 20x24 tiles, 1-pixel borders, upscaled
    width, height = Image.open(run / "reconstructions.png").size
    scale = height // (2 * (H + 1) + 1)
    assert height == scale * (2 * (H + 1) + 1) and width % scale == 0 and (width // scale - 1) % (W + 1) == 0
    if recipe == "vqvae/tiny":  # the second stage: a PixelCNN prior over the frozen model's code maps
        assert model.encode_codes(batch["x"][:2]).shape == (2, 5, 6)
        prior_run = train_recipe("vqvae/prior-tiny", tmp_path / "prior", f"data.root={shapes}",
                                 f"model.stage1={run}", "trainer.max_epochs=2")
        prior, _ = load_model(prior_run)
        with torch.no_grad():
            assert prior.sample(2).shape == (2, 3, H, W)


@pytest.mark.parametrize("recipe, overrides", [
    *[(r, []) for r in ("ddpm/tiny", "flow_matching/tiny", "glow/tiny", "realnvp/tiny", "score/tiny", "ebm/tiny",
                        "jem/tiny", "rbm/tiny")],
    ("pixelcnn/tiny", ["model.hidden_channels=18"]),  # (a multiple of the 3 channels: RGB sub-pixel masks)
])
def test_family_runs_on_non_square_images_and_samples_their_shape(recipe: str, overrides: list[str], shapes: Path,
                                                                  tmp_path: Path, train_recipe) -> None:
    run = train_recipe(recipe, tmp_path / "run", f"data.root={shapes}", "trainer.max_steps=4",
                       "trainer.max_epochs=null", "data.batch_size=16", *overrides)
    model, _ = load_model(run)
    with torch.no_grad():
        assert model.sample(2).shape == (2, 3, H, W)
