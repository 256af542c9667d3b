"""No host-device synchronization in a training step: every family's tiny recipe, trained by a real
Lightning Trainer, reads no tensor into Python (`.item()`, `bool(t)`, `int(t)`, a Python `if` on a tensor)
between the start and the end of a training batch, outside the steps on which the loggers write.

Each such read dispatches to `aten::_local_scalar_dense`, on CPU as on a GPU, so a dispatch mode around the
batch counts them without a GPU (benchmarks/gpu_check.py counts them on the device too).
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scalegen.config import load_config
from scalegen.config.loader import RECIPES_DIR
from scalegen.runtime.train import train

TINY = sorted(RECIPES_DIR.rglob("tiny*.yaml"))
LOG_EVERY = 50  # loggers write on step 0 and 49 only: steps 3..11 are quiet


class _CountReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack() if "/scalegen/" in f.filename]
            self.where[f"{frames[-1].filename.rsplit('/scalegen/', 1)[-1]}:{frames[-1].lineno}" if frames
                       else "outside scalegen"] += 1
        return func(*args, **(kwargs or {}))


class _QuietStepReads(L.Callback):
    def __init__(self) -> None:
        self.mode: _CountReads | None = None
        self.where: collections.Counter[str] = collections.Counter()
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if 2 < trainer.global_step < LOG_EVERY - 1:
            self.mode = _CountReads()
            self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.where.update(self.mode.where)
            self.steps += 1
            self.mode = None


@pytest.mark.parametrize("recipe", TINY, ids=[str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in TINY])
def test_training_steps_read_no_tensor_into_python(recipe: Path, tmp_path: Path) -> None:
    cfg = load_config(str(recipe), ["trainer.progress_bar=false", "logging.wandb=false", f"run.dir={tmp_path}",
                                    "run.name=syncs", "trainer.max_steps=12", "trainer.max_epochs=null",
                                    f"trainer.log_every_n_steps={LOG_EVERY}", "trainer.limit_val_batches=0",
                                    "trainer.resume=never"])
    counter = _QuietStepReads()
    train(cfg, callbacks=[counter])
    assert counter.steps >= 3, f"only {counter.steps} quiet steps were counted"
    assert not counter.where, f"host reads per place over {counter.steps} steps: {dict(counter.where)}"
