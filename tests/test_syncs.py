"""No host-device synchronization in a training step: every family's tiny recipe, trained by a real
Lightning Trainer, reads no tensor into Python (`.item()`, `bool(t)`, `int(t)`, a Python `if` on a tensor)
from the start of a training batch to the start of the next (Lightning's own work after the batch included),
outside the steps on which the loggers write.

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
LOG_EVERY = 50  # loggers write on steps 0, 49 and the last (11) only
QUIET = (3, 9)  # each counted up to the start of the next step, so 10 is the last one reached


class _CountReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            stack = traceback.extract_stack()
            # The data pipeline reads host tensors before the batch moves to the device: not a sync.
            if not any("/scalegen/data/" in f.filename for f in stack):
                frames = [f for f in stack if ("/scalegen/" in f.filename or "/lightning/" in f.filename)
                          and "/utilities/" not in f.filename]
                self.where[f"{frames[-1].filename.rsplit('site-packages/', 1)[-1].rsplit('/scalegen/', 1)[-1]}:"
                           f"{frames[-1].lineno}" if frames else "elsewhere"] += 1
        return func(*args, **(kwargs or {}))


class _QuietStepReads(L.Callback):
    """Counts from the start of a quiet batch to the start of the next one: the module's step and hooks, the
    callbacks, and what Lightning does after them (its logger connector reads progress-bar values there)."""

    def __init__(self) -> None:
        self.mode: _CountReads | None = None
        self.epoch = -1
        self.where: collections.Counter[str] = collections.Counter()
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            if trainer.current_epoch == self.epoch:  # an epoch's end is a step on which the loggers write
                self.where.update(self.mode.where)
                self.steps += 1
            self.mode = None
        if QUIET[0] <= trainer.global_step <= QUIET[1]:
            self.mode, self.epoch = _CountReads(), trainer.current_epoch
            self.mode.__enter__()


def _config(recipe: str, tmp_path: Path, progress_bar: bool = False):
    """12 steps without validation, logging on steps 0, 49 and the last only."""
    return load_config(recipe, [f"trainer.progress_bar={progress_bar}", "logging.wandb=false", f"run.dir={tmp_path}",
                                "run.name=syncs", "trainer.max_steps=12", "trainer.max_epochs=null",
                                f"trainer.log_every_n_steps={LOG_EVERY}", "trainer.limit_val_batches=0",
                                "trainer.resume=never"])


@pytest.mark.parametrize("recipe", TINY, ids=[str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in TINY])
def test_training_steps_read_no_tensor_into_python(recipe: Path, tmp_path: Path) -> None:
    cfg = _config(str(recipe), tmp_path)
    counter = _QuietStepReads()
    train(cfg, callbacks=[counter])
    assert counter.steps >= 3, f"only {counter.steps} quiet steps were counted"
    assert not counter.where, f"host reads per place over {counter.steps} steps: {dict(counter.where)}"


class _ShownLoss(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_loss = outputs["loss"].detach()  # read at the end: a read here would count as the step's

    def on_train_end(self, trainer, pl_module) -> None:
        self.shown = trainer.progress_bar_callback.get_metrics(trainer, pl_module)["train/loss"]


def test_the_progress_bar_shows_the_logged_loss_without_reading_it_every_step(tmp_path: Path) -> None:
    # Lightning reads a `prog_bar=True` value into Python after every batch (a GPU sync); scalegen's bar reads
    # the loss once, when a step logs it. With the bar on, the quiet steps read nothing either.
    counter, shown = _QuietStepReads(), _ShownLoss()
    train(_config("vae/tiny", tmp_path, progress_bar=True), callbacks=[counter, shown])
    assert counter.steps >= 3 and not counter.where, dict(counter.where)
    assert shown.shown == float(shown.last_loss)  # the last step (max_steps) logs its loss
