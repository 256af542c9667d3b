"""Checkpoint-and-stop on a preemption signal.

`Preemption` turns a signal (SLURM sends `--signal` some minutes before the time limit; an operator
may `scancel --signal=USR1`) into: all ranks agree at the next optimizer-step boundary, a checkpoint
is written there, a marker file `{run_dir}/.preempted` is left for the batch script (which requeues
the job), and every rank exits with code 3 (`PREEMPTED_EXIT_CODE`). The handler itself only sets a
flag: checkpointing inside a signal handler would save whatever half-finished step each rank was in.

Not a callback of its own (each attached callback costs every training step): the runtime's
`CheckpointWriting` (scalegen/runtime/checkpoint.py) calls it from its setup, teardown and batch-end hooks.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from scalegen.errors import UserError

PREEMPTED_MARKER = ".preempted"
PREEMPTED_EXIT_CODE = 3  # `scalegen train` stopped for preemption after writing its checkpoint


class Preemption:
    """Checkpoint at the next step boundary and stop when `signum` arrives (see the module docstring)."""

    def __init__(
        self, run_dir: str | Path, signum: int | str = signal.SIGUSR1, checkpoint_name: str = "last.ckpt"
    ) -> None:
        self.run_dir = Path(run_dir)
        self.signum = getattr(signal, signum) if isinstance(signum, str) else int(signum)
        self.checkpoint_name = checkpoint_name
        self.received = False  # set by the handler in this process
        self.preempted_at: int | None = None  # optimizer step where training stopped for preemption
        self._previous: Any = None
        self._last_checked_step = -1

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / self.checkpoint_name

    @property
    def marker(self) -> Path:
        return self.run_dir / PREEMPTED_MARKER

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = True

    def install(self, trainer: L.Trainer) -> None:
        """Catch the signal (from the main thread only: Python allows handlers nowhere else)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if self.signum == signal.SIGTERM:
            raise UserError(
                "trainer.requeue_signal=SIGTERM is what SLURM sends before killing a job; "
                "use SIGUSR1 or SIGUSR2 with #SBATCH --signal"
            )
        self._previous = signal.signal(self.signum, self._handler)
        if trainer.is_global_zero and self.marker.exists():
            self.marker.unlink()  # a marker from the previous (requeued) attempt

    def uninstall(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _agreed(self, trainer: L.Trainer) -> bool:
        """Whether any rank got the signal; every rank calls this at the same step."""
        if trainer.world_size == 1:
            return self.received  # nothing to agree on: no tensor, no reduction, on every step
        flag = torch.tensor(1.0 if self.received else 0.0, device=trainer.strategy.root_device)
        flag = trainer.strategy.reduce(flag, reduce_op="max")
        return bool(flag.item() > 0)

    def check(self, trainer: L.Trainer) -> None:
        """At a training batch's end, after every other callback's: checkpoint and exit if any rank got the signal."""
        step = trainer.global_step
        if step == self._last_checked_step:  # mid-accumulation: not a step boundary
            return
        self._last_checked_step = step
        if not self._agreed(trainer):
            return
        # Save where ModelCheckpoint keeps `last`, and tell it so: after the resume it then overwrites this
        # file instead of starting a `last-v1.ckpt` beside it (trainer.resume=auto reads last.ckpt).
        here = self.checkpoint_path.parent
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and Path(cb.dirpath or "") == here:
                cb.last_model_path = str(self.checkpoint_path)
        trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # a full one: the requeued job resumes it
        trainer.strategy.barrier("scalegen_preempt")
        if trainer.is_global_zero:
            tmp = self.marker.with_suffix(".tmp")
            job = os.environ.get("SLURM_JOB_ID", "")
            tmp.write_text(f"step={step}\ncheckpoint={self.checkpoint_path}\njob={job}\n")
            tmp.replace(self.marker)
            print(
                f"scalegen: preempted by {signal.Signals(self.signum).name} at step {step}; checkpoint "
                f"{self.checkpoint_path}; the same command resumes from it",
                file=sys.stderr,
                flush=True,
            )
        self.preempted_at = step
        # Leave at once, on every rank at the same step: stopping through `should_stop` would first run
        # a validation pass and more checkpoint saves, drawing random numbers an uninterrupted run does not.
        raise SystemExit(PREEMPTED_EXIT_CODE)
