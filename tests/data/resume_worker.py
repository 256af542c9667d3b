"""`python resume_worker.py OUT RECIPE [overrides...]`: `scalegen train` with a probe that saves, on every rank, what
the run holds when its first training batch starts (after a resume: what it restored) to OUT/rank{R}.pt.

A script (not `-m scalegen`) so the probe can ride along; Lightning's DDP launcher starts the other ranks by
running this same command again."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from scalegen.callbacks.ema import EMA
from scalegen.config import load_config
from scalegen.runtime.train import train


class Probe(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.done = out, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.done:
            return
        self.done = True
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({
            "global_step": trainer.global_step,
            "batch_idx": batch_idx,
            "world_size": trainer.world_size,
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "ema": ema.ema.weights(),
            "weights": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
        }, self.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    train(load_config(sys.argv[2], sys.argv[3:]), callbacks=[Probe(out)])
