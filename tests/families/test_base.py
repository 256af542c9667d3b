"""The family contract itself (scalegen/families/base.py): declared predictions, the checkpoint monitor,
and callers that leave gradients to the family's sampler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch import Tensor, nn

from scalegen.callbacks.figures import RunFigures
from scalegen.config.schema import Config, ModelConfig, OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.errors import ConfigError
from scalegen.eval.runner import generate
from scalegen.families.base import PREDICTIONS, GenerativeModel
from scalegen.registry import families, get_family
from scalegen.runtime.train import build_trainer


@pytest.mark.parametrize("name", sorted(n for n in families() if not n.startswith("test_")))
def test_each_family_declares_exactly_the_predictions_it_implements(name: str) -> None:
    cls = get_family(name).module
    implemented = {p for p in PREDICTIONS if getattr(cls, p) is not getattr(GenerativeModel, p)}
    assert cls.predictions == implemented, (name, sorted(cls.predictions), sorted(implemented))


def test_an_unknown_prediction_or_nll_kind_fails_at_class_definition() -> None:
    with pytest.raises(TypeError, match="unknown.*'logits'"):
        type("Bad", (GenerativeModel,), {"predictions": frozenset({"logits"})})
    with pytest.raises(TypeError, match="nll_kind='nats'"):
        type("Bad", (GenerativeModel,), {"nll_kind": "nats"})


def _checkpointing(family: str, tmp_path: Path, **checkpoint) -> ModelCheckpoint:
    entry = get_family(family)
    cfg = OmegaConf.structured(Config(model=entry.config()))
    for key, value in checkpoint.items():
        cfg.checkpoint[key] = value
    cfg.trainer.accelerator, cfg.logging.wandb, cfg.trainer.progress_bar = "cpu", False, False
    spec = DataSpec(shape=(1, 8, 8))
    model = entry.module(cfg.model, cfg.optim, spec)
    trainer = build_trainer(cfg, tmp_path, spec, model=model)
    return next(cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint))


def test_checkpoint_monitor_defaults_to_the_familys(tmp_path: Path) -> None:
    vae = _checkpointing("vae", tmp_path)
    assert vae.monitor == "val/loss" and vae.save_top_k == 1
    gan = _checkpointing("gan", tmp_path)  # a GAN's losses do not rank its samples: no best checkpoint
    assert gan.monitor is None and gan.save_top_k == 0 and gan.save_last
    named = _checkpointing("gan", tmp_path, monitor="eval/domain_fid", mode="min")
    assert named.monitor == "eval/domain_fid" and named.save_top_k == 1


@dataclass
class LangevinConfig(ModelConfig):
    family: str = "langevin_toy"


class Langevin(GenerativeModel):
    """E(x) = |x - m|^2 / 2; `sample` takes gradient steps on E, so it needs autograd."""

    predictions = frozenset({"sample", "energy"})

    def __init__(self, cfg: LangevinConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        self.m = nn.Parameter(torch.full(data.shape, 0.6))

    def energy(self, x: Tensor) -> Tensor:
        return 0.5 * ((x - self.m) ** 2).flatten(1).sum(1)

    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        x = torch.zeros(n, *self.data_spec.shape, requires_grad=True)
        for _ in range(50):  # gradient descent on E (Langevin without noise): x -> m
            (grad,) = torch.autograd.grad(self.energy(x).sum(), x)
            x = (x - 0.2 * grad).detach().requires_grad_(True)
        return (x.detach() * 255).round().clamp(0, 255).to(torch.uint8)


def test_eval_and_figures_leave_gradients_to_the_sampler(tmp_path: Path) -> None:
    model = Langevin(LangevinConfig(), OptimConfig(), DataSpec(shape=(1, 4, 4)))
    samples = generate(model, 6, batch_size=4)  # would raise under a forced torch.no_grad
    assert samples.shape == (6, 1, 4, 4) and (samples == 153).all()  # 0.6 * 255, the energy's minimum
    RunFigures(tmp_path, tmp_path / "metrics.jsonl", num_samples=4).write_images(model)
    assert (tmp_path / "samples.png").is_file()


@pytest.mark.parametrize("name", sorted(n for n, e in families().items() if e.module.data_kinds))
def test_a_family_refuses_data_of_a_kind_it_does_not_model(name: str) -> None:
    entry = get_family(name)
    other = "audio" if "audio" not in entry.module.data_kinds else "image"
    spec = DataSpec(kind=other, shape=(1, 4000) if other == "audio" else (1, 8, 8), num_classes=10)
    with pytest.raises(ConfigError, match=f"^the {name} family models .*; data '{other}' is not supported$"):
        entry.module(entry.config(), OptimConfig(), spec)
