"""`RankState`: every rank's `model.rank_state()` in every checkpoint, and each rank's own back on resume.

A family may hold state that differs per rank and is not in its (replicated) state dict: an EBM's
replay buffer, an RBM's persistent chains. `on_save_checkpoint` runs on every rank (rank 0 alone writes
the file), so the states are gathered to every rank with `torch.distributed.all_gather_object` and
stored as a list, one entry per rank, under `checkpoint["rank_states"]`, in the one checkpoint file.
On resume rank r gets entry r through `model.load_rank_state(state, saved_world_size, world_size)`;
at another world size the family receives every saved rank's state to re-deal, or refuses (the
default) with a one-line UserError.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

KEY = "rank_states"


def _to_cpu(obj: Any) -> Any:
    """Tensors moved to the CPU (a checkpoint loads on any device; all_gather_object pickles them)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def gather_to_all(trainer: L.Trainer, obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a collective: every rank must call it)."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


class RankState(L.Callback):
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        state = _to_cpu(pl_module.rank_state())
        states = gather_to_all(trainer, state)
        if any(states):
            checkpoint[KEY] = states

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(KEY)
        if not states:
            return
        saved, world = len(states), trainer.world_size
        own = states[trainer.global_rank] if saved == world else dict(enumerate(states))
        pl_module.load_rank_state(own, saved, world)
