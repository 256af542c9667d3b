"""Shared pieces of the distributed tests: a launcher, a family model, its config, digit batches per rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import scalegen.families  # noqa: F401  (registers the built-in families)
from scalegen.config.schema import Config, DataConfig
from scalegen.dataspec import DataSpec

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `script` in `nproc` processes with torchrun (gloo on CPU); fail the test with its output."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(HERE / script),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


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
