"""Shared pieces of the distributed tests: a family model, its config, and digit batches per rank."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf

from scalegen.config.schema import Config, DataConfig
from scalegen.families.base import DataSpec

DIGITS_SPEC = DataSpec(kind="image", shape=(1, 8, 8), num_classes=10, levels=256)


def family_name() -> str:
    """The family the engine checks train: the VAE when it is registered (it is on main)."""
    from scalegen.registry import families

    return "vae" if "vae" in families() else ""


def trainer_config(**trainer: object):
    """A full typed config for the digits with `trainer.*` overrides (the family's defaults otherwise)."""
    from scalegen.registry import get_family

    name = family_name()
    model_cfg = get_family(name).config() if name else None
    cfg = OmegaConf.structured(Config(model=model_cfg, data=DataConfig(root="unused")))
    cfg.optim.lr = 3e-3
    cfg.optim.warmup_steps = 2  # exercise the LR schedule inside the engine too
    for key, value in trainer.items():
        cfg.trainer[key] = value
    return cfg


def build_model(cfg) -> torch.nn.Module:
    """The family's LightningModule (its `loss` is the objective the engines optimize)."""
    torch.manual_seed(0)
    name = family_name()
    if name:
        from scalegen.registry import get_family

        return get_family(name).module(cfg.model, cfg.optim, DIGITS_SPEC)
    return TinyGaussianAE()


class TinyGaussianAE(torch.nn.Module):
    """Stand-in until a family is registered: a deterministic autoencoder with a Gaussian likelihood."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
        self.dec = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 64))

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        x = batch["x"].flatten(1).to(self.enc[0].weight.dtype) / 255.0
        rec = self.dec(self.enc(x))
        return ((rec - x) ** 2).sum(1).mean(), {}


def digit_batches(rank: int, world: int, micro: int, n: int) -> list[dict]:
    """`n` micro-batches of `micro` digits for `rank`: global batch j is split across ranks by rank."""
    from sklearn.datasets import load_digits

    images = load_digits().images  # 0..16 grey levels
    x = np.clip(images * 16, 0, 255).astype(np.uint8)[:, None]
    y = load_digits().target
    order = np.random.default_rng(0).permutation(len(x))
    out = []
    for j in range(n):
        start = (j * world + rank) * micro
        idx = order[np.arange(start, start + micro) % len(x)]
        out.append(
            {
                "x": torch.from_numpy(x[idx]),
                "y": torch.from_numpy(y[idx]).long(),
                "key": [str(i) for i in idx],
            }
        )
    return out
