"""`RankState`: what differs per rank, in every checkpoint, and each rank's own back on resume.

Not a callback of its own (each attached callback costs every training step): the runtime's
`CheckpointWriting` (scalegen/runtime/checkpoint.py), which writes scalegen's side of every checkpoint,
calls it from its checkpoint and first-batch hooks.

Two things differ per rank and are not in the (replicated) state dict: the random generators, and a
family's `model.rank_state()` (an EBM's replay buffer, an RBM's persistent chains). `on_save_checkpoint`
runs on every rank (rank 0 alone writes the file), so both are gathered to every rank in one
`torch.distributed.all_gather_object` and stored as lists, one entry per rank, in the one checkpoint file:

- `checkpoint["rng_states"]`: the torch (CPU and CUDA), numpy and Python generators. Each rank's own is
  restored at the first training batch after a resume (not earlier: creating the data iterator draws
  from the torch generator, and the uninterrupted run drew that number at the start of the epoch, not
  at the restart). This is exact for checkpoints taken mid-epoch, and at epoch boundaries too when the
  training DataLoader has its own `generator` (otherwise creating the next epoch's iterator draws a seed
  from the global generator at a point a resumed run cannot mirror). At another world size the random
  streams continue from the seed, with a warning.
- `checkpoint["rank_states"]` (only when some rank has state): rank r gets entry r through
  `model.load_rank_state(state, saved_world_size, world_size)`; at another world size the family receives
  every saved rank's state to re-deal, or refuses (the default) with a one-line UserError.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

KEY = "rank_states"
RNG_KEY = "rng_states"


def rng_state() -> dict[str, Any]:
    """This process's generator states as tensors and plain lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


class RankState:
    """Every rank's RNG states and `model.rank_state()` in each checkpoint; each rank's own back on resume."""

    def __init__(self) -> None:
        self._pending_rng: list[dict[str, Any]] | None = None

    def save(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        gathered = gather_to_all(trainer, (rng_state(), _to_cpu(pl_module.rank_state())))
        checkpoint[RNG_KEY] = [rng for rng, _ in gathered]
        states = [state for _, state in gathered]
        if any(states):
            checkpoint[KEY] = states

    def load(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._pending_rng = checkpoint.get(RNG_KEY)
        states = checkpoint.get(KEY)
        if not states:
            return
        saved, world = len(states), trainer.world_size
        own = states[trainer.global_rank] if saved == world else dict(enumerate(states))
        pl_module.load_rank_state(own, saved, world)

    def restore_rng(self, trainer: L.Trainer) -> None:
        """At a training batch's start: the RNG states loaded with the checkpoint, once."""
        if self._pending_rng is None:
            return
        states, self._pending_rng = self._pending_rng, None
        if len(states) != trainer.world_size:
            rank_zero_warn(f"checkpoint has RNG states of {len(states)} ranks, this run has {trainer.world_size}: "
                           "random streams continue from the seed, not exactly")
            return
        set_rng_state(states[trainer.global_rank])
