"""`trainer.compile`: the family's networks compiled in place train exactly like eager ones.

Tolerances. With dynamo's `eager` backend the traced graphs run the same ATen kernels in the same
order, so 20 steps agree to float32 round-off (rel 1e-6). Inductor fuses and reorders float32
arithmetic in its own kernels, which changes each result by round-off (~1e-7 relative); Adam's
normalized updates let such differences grow over 20 steps, hence the looser 1e-3 for it.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from scalegen.callbacks.compile import CompileNetworks, compile_networks
from scalegen.config import load_config
from scalegen.errors import ConfigError
from scalegen.runtime import load_model
from scalegen.runtime.train import train

STEPS = 20
QUIET = ["trainer.progress_bar=false", "logging.wandb=false", "trainer.resume=never",
         f"trainer.max_steps={STEPS}", "trainer.max_epochs=null", "checkpoint.every_n_epochs=null",
         "trainer.limit_val_batches=0"]


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.values.append(loss.detach().clone())


def run(recipe: str, tmp_path, name: str, *overrides: str, callbacks=()) -> tuple[list[float], dict]:
    cfg = load_config(recipe, [*QUIET, f"run.dir={tmp_path}", f"run.name={name}", *overrides])
    losses = Losses()
    train(cfg, callbacks=[losses, *callbacks])
    model, _ = load_model(tmp_path / name, use_ema=False)
    return [float(v) for v in losses.values], model.state_dict()


def assert_same(a: tuple, b: tuple, rel: float) -> None:
    (la, wa), (lb, wb) = a, b
    assert len(la) == len(lb) == STEPS
    for x, y in zip(la, lb):
        assert math.isclose(x, y, rel_tol=rel), (la, lb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rel, atol=rel)


@pytest.mark.parametrize("recipe", ["vae/tiny", "ddpm/tiny"])
def test_dynamo_traced_networks_train_like_eager(recipe, tmp_path):
    eager = run(recipe, tmp_path, "eager")
    traced = run(recipe, tmp_path, "traced", callbacks=[CompileNetworks("default", backend="eager")])
    assert_same(traced, eager, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["vae/tiny", "ddpm/tiny"])
def test_trainer_compile_matches_eager(recipe, tmp_path):
    # The real thing: inductor code generation (C++ on CPU), through the recipe key.
    eager = run(recipe, tmp_path, "eager")
    compiled = run(recipe, tmp_path, "compiled", "trainer.compile=true")
    assert_same(compiled, eager, rel=1e-3)


def test_which_modules_are_compiled():
    from scalegen.dataspec import DataSpec
    from scalegen.registry import get_family

    cfg = load_config("vae/mnist-conditional", [])
    model = get_family("vae").module(cfg.model, cfg.optim, DataSpec(shape=(1, 28, 28)))
    names = compile_networks(model, backend="eager")
    assert names == ["encoder", "decoder"]  # the label prior (a lone nn.Embedding) stays eager
    keys = set(model.state_dict())
    assert not any("_orig_mod" in k for k in keys)  # compiled in place: checkpoints keep their keys

    class Eager(torch.nn.Module):
        compile_unsupported = "data-dependent control flow"

        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(2, 2))

    with pytest.warns(UserWarning, match="Eager runs eager \\(data-dependent control flow\\)"):
        assert compile_networks(Eager()) == []
    with pytest.raises(ConfigError, match="compile_mode"):
        compile_networks(Eager(), mode="fast")
