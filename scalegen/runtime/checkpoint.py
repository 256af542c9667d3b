"""Writing checkpoints: atomic writes, and the config and per-rank states inside every checkpoint (reading them:
scalegen.checkpoints)."""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import WandbLogger  # (wandb itself is imported only when a run starts)
from lightning.pytorch.plugins.io import TorchCheckpointIO

from scalegen.callbacks.rank_state import RankState
from scalegen.checkpoints import atomic_save
from scalegen.errors import UserError
from scalegen.runtime.preemption import Preemption


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file beside the target and renames it over: a crash while saving
    leaves the previous checkpoint intact (os.replace is atomic on POSIX)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        try:
            atomic_save(checkpoint, path)
        except (OSError, RuntimeError) as err:
            if _disk_full(err):  # one line naming the space needed; the previous checkpoint is intact
                raise DiskFullError(_disk_full_message(checkpoint, path)) from None
            raise


def _disk_full(err: BaseException | None) -> bool:
    """ENOSPC in `err` or the errors it was raised during (torch's zip writer re-raises a RuntimeError while
    closing a file whose write failed)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        err = err.__context__
    return False


class DiskFullError(UserError):
    """A checkpoint that did not fit on its disk."""


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary checkpoints in `folder` left by processes of this host that no longer run (a
    save killed by SIGKILL); another host's, and a live process's, are left alone. Returns those removed."""
    removed = []
    host = socket.gethostname()
    for tmp in Path(folder).glob(f".*.tmp-{host}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _disk_full_message(checkpoint: dict[str, Any], path: Path) -> str:
    def nbytes(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(nbytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(nbytes(v) for v in obj)
        return 0

    free = shutil.disk_usage(path.parent).free
    return (f"disk full: checkpoint {path} needs about {nbytes(checkpoint) / 2**20:.1f} MiB "
            f"(its tensors) and {path.parent} has {free / 2**20:.1f} MiB free; the previous checkpoint is "
            "intact: free space (or point the run folder elsewhere) and resume")


# Keys that say how to run, not what is trained: a resume may always change them.
ALWAYS_ALLOWED = ("trainer.resume", "trainer.resume_allow_changes", "trainer.progress_bar")


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two resolved recipes (added and removed keys too)."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        return {k: v for key, value in d.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    a, b = flat(saved), flat(current)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def check_resume_recipe(ckpt: str | Path, current: dict[str, Any], allowed: list[str]) -> None:
    """Refuse (one line) to resume `ckpt` with a recipe that differs from the one it was trained with,
    except in keys matching `allowed` (glob patterns) or `ALWAYS_ALLOWED`. A ZeRO checkpoint folder and a
    checkpoint without a saved recipe are not checked."""
    if Path(ckpt).is_dir():
        return
    saved = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True).get("scalegen", {}).get("config")
    if saved is None:
        return
    patterns = (*ALWAYS_ALLOWED, *allowed)
    changed = [k for k in recipe_changes(saved, current) if not any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    if changed:
        raise UserError(
            f"cannot resume {ckpt}: the recipe changed in {', '.join(changed)}; run with the recipe it was "
            f"trained with, or allow the change: trainer.resume_allow_changes=[{','.join(changed)}] "
            "(or trainer.resume=never to start afresh)"
        )


class CheckpointWriting(Checkpoint):
    """scalegen's side of every checkpoint (one callback: each one attached costs every step).

    - The resolved config and the DataSpec go into every checkpoint (`checkpoint["scalegen"]`), so a
      checkpoint alone rebuilds its model.
    - Every rank's RNG states and family rank state (`RankState`, scalegen/callbacks/rank_state.py) go in
      too, and each rank's own come back on resume.
    - On a preemption signal, a checkpoint at the next step boundary and a stop (`Preemption`,
      scalegen/runtime/preemption.py). A `Checkpoint`, so Lightning runs its hooks after
      every ordinary callback's: the checkpoint it writes at a step includes what the EMAs did at that step.
    - A save that finds the disk full stops training with `DiskFullError`; what was logged before it stopped
      is passed on. A checkpoint at a step's end is written by a callback, which Lightning runs before it
      hands that step's logged values to the loggers: on a step whose scalars are logged (the family's
      `logs_this_step`), they (`trainer.logged_metrics`) are written here, then every logger is saved and a
      W&B run finished, so the metrics file and W&B hold every metric logged up to the failure. (A save at a
      validation's end comes after Lightning has logged the validation metrics.)
    """

    def __init__(self, resolved_config: dict, data_spec: Any, preemption: Preemption) -> None:
        self.payload = {"config": resolved_config, "data_spec": dataclasses.asdict(data_spec)}
        self.rank_state = RankState()
        self.preemption = preemption

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.preemption.install(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.preemption.uninstall()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["scalegen"] = self.payload
        self.rank_state.save(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.rank_state.load(trainer, pl_module, checkpoint)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.rank_state.restore_rng(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.preemption.check(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, DiskFullError):
            return
        logs = getattr(pl_module, "logs_this_step", None)
        metrics = {k: float(v) for k, v in trainer.logged_metrics.items()}
        for logger in trainer.loggers:
            if trainer.training and metrics and (logs is None or logs()):
                # Lightning numbers a step's row by the optimizer steps before it.
                logger.log_metrics(metrics, step=max(trainer.global_step - 1, 0))
            logger.save()
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.finish(exit_code=1)  # flushed and closed now, not at interpreter exit
