"""Exponential moving average of the weights, one mechanism for every family.

After optimizer step t (counted from 1), every `every_n_steps` steps,

    ema <- d_t * ema + (1 - d_t) * theta_t,    d_t = min(decay, (1 + t) / (10 + t)) while t < warmup_steps,
                                               d_t = decay afterwards,

starting from ema = theta_0 (the weights when training starts). With a constant decay d and n
updates this is the closed form ema_n = d^n theta_0 + (1 - d) sum_{i=1..n} d^(n-i) theta_i
(tested in tests/distributed/test_ema.py). Floating-point buffers (e.g. batch-norm statistics) are
averaged the same way; integer buffers are copied.

The average is keyed like `model.state_dict()`, saved in checkpoints as `checkpoint["ema_state_dict"]`
and restored on resume. Validation (and everything run through `EMA.swapped`) uses it by default.

A power-function EMA (`gamma` set; EDM2, `scalegen.ema_profiles`) uses d_t = (1 - delta/t)^(gamma + 1)
instead, delta the steps since its previous update; the post-hoc EMA callback
(`scalegen.callbacks.posthoc_ema`) keeps several, updated together by `update_averages` (one gather
under ZeRO-3 for all of them).

Sharding: under DDP and ZeRO-1/2 every rank holds identical whole parameters, so every rank keeps
the same average without communication. Under ZeRO-3 parameters are gathered for the update
(`scalegen.distributed.full_parameters`) and only rank 0 keeps the average, so no other rank pays its
memory; rank 0's copy is what checkpoints hold, and swapping it in broadcasts it. A `sliced` state (the
post-hoc EMAs, which are never swapped in) instead keeps on rank r of W only slice r of each flattened
tensor, `torch.tensor_split(t.reshape(-1), W)[r]` (the first n % W ranks get one element more), so the
ranks together hold one copy and each 1/W of it. Under FSDP every rank keeps the whole average: its
gather writes back each rank's shard from that rank's whole copy (so a swap needs it whole everywhere),
and Lightning's FSDP checkpoint keeps rank 0's callback state only (so slices would not survive one).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import Tensor

from scalegen.distributed.gather import full_parameters, is_zero3_partitioned
from scalegen.ema_profiles import power_beta


def ema_decay(step: int, decay: float, warmup_steps: int) -> float:
    """Decay used for the update after optimizer step `step` (>= 1)."""
    if warmup_steps > 0 and step < warmup_steps:
        return min(decay, (1 + step) / (10 + step))
    return decay


def _named_tensors(module: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Parameters and buffers under their state_dict names (persistent buffers only)."""
    state_names = set(module.state_dict(keep_vars=True).keys())
    for name, p in module.named_parameters():
        yield name, p
    for name, b in module.named_buffers():
        if name in state_names:
            yield name, b


class EMAState:
    """The averaged weights and the update rule, independent of Lightning (usable with a bare engine)."""

    def __init__(
        self,
        decay: float = 0.999,
        warmup_steps: int = 0,
        every_n_steps: int = 1,
        on_cpu: bool = False,
        gamma: float | None = None,
        sliced: bool = False,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"ema every_n_steps must be >= 1, got {every_n_steps}")
        self.decay, self.warmup_steps, self.every_n_steps, self.on_cpu = (
            decay,
            warmup_steps,
            every_n_steps,
            on_cpu,
        )
        self.gamma = gamma  # power-function exponent (EDM2); None: the constant decay with warm-up
        self.sliced = sliced  # under ZeRO-3 keep this rank's slice of each tensor only (not swappable)
        self.split = (0, 1)  # (rank, world): `shadow` holds slice rank of world of each flattened tensor
        self.shapes: dict[str, tuple[int, ...]] = {}  # the whole tensors' shapes
        self.shadow: dict[str, Tensor] = {}  # empty on ranks that do not own the average (ZeRO-3: rank != 0)
        self.num_updates = 0
        self.last_step = 0  # optimizer step of the last update

    def owns(self, module: torch.nn.Module) -> bool:
        """Whether this rank keeps (a slice of) the average: every rank, or only rank 0 when parameters are
        sharded and the state is not sliced."""
        if not is_zero3_partitioned(module) or self.sliced:
            return True
        return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def split_for(self, module: torch.nn.Module) -> tuple[int, int]:
        """(rank, world) of the slice this state keeps for `module`: (0, 1), the whole tensors, unless sliced
        under ZeRO-3."""
        if self.sliced and is_zero3_partitioned(module) and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def part(self, t: Tensor) -> Tensor:
        """This rank's slice of `t` flattened (a view), or `t` itself when the state is whole."""
        rank, world = self.split
        return t if world == 1 else torch.tensor_split(t.reshape(-1), world)[rank]

    @torch.no_grad()
    def init_from(self, module: torch.nn.Module, root: Any = None) -> None:
        """Start the average at the module's current weights (all ranks call this together)."""
        with full_parameters(module, root=root):
            self.split = self.split_for(module)
            if self.owns(module):
                device = "cpu" if self.on_cpu else None
                tensors = list(_named_tensors(module))
                self.shapes = {n: tuple(t.shape) for n, t in tensors}
                self.shadow = {n: self.part(t.detach()).clone().to(device or t.device) for n, t in tensors}
            else:
                self.shadow = {}

    def due(self, step: int) -> bool:
        return step > self.last_step and step % self.every_n_steps == 0

    def decay_at(self, step: int) -> float:
        if self.gamma is not None:  # delta: steps since the last update, so the profile stays exact
            return power_beta(step, self.gamma, step - self.last_step)
        return ema_decay(step, self.decay, self.warmup_steps)

    def update(self, module: torch.nn.Module, step: int, root: Any = None) -> bool:
        """Fold the weights after optimizer step `step` into the average when the step is due.
        All ranks call this together (under ZeRO-3 it gathers). Returns whether it updated."""
        return update_averages([self], module, step, root)

    @torch.no_grad()
    def copy_to(
        self, module: torch.nn.Module, source: dict[str, Tensor] | None = None, root: Any = None
    ) -> None:
        """Write `source` (default: the average) into the module's weights; all ranks call it together."""
        source = self.shadow if source is None else source
        if self.split[1] > 1:
            raise RuntimeError("a sliced average holds 1/world of each tensor and cannot be copied into the model")
        with full_parameters(module, modify=True, root=root):
            if source:
                for name, t in _named_tensors(module):
                    t.copy_(source[name].to(t.device, t.dtype))

    @torch.no_grad()
    def snapshot(self, module: torch.nn.Module, root: Any = None) -> dict[str, Tensor]:
        """A copy of the module's current weights on the ranks that own the average ({} elsewhere)."""
        with full_parameters(module, root=root):
            if not self.owns(module):
                return {}
            return {n: t.detach().clone() for n, t in _named_tensors(module)}

    @contextmanager
    def swapped(self, module: torch.nn.Module, root: Any = None) -> Iterator[None]:
        """Run the block with the averaged weights in the module, then put the trained weights back."""
        backup = self.snapshot(module, root)
        self.copy_to(module, root=root)
        try:
            yield
        finally:
            self.copy_to(module, backup, root=root)

    def state_dict(self) -> dict[str, Any]:
        """Bookkeeping for resume (the weights themselves go to checkpoint["ema_state_dict"])."""
        return {
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "decay": self.decay,
            "warmup_steps": self.warmup_steps,
            "every_n_steps": self.every_n_steps,
            "gamma": self.gamma,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.last_step = int(state["last_step"])

    def weights(self) -> dict[str, Tensor]:
        """The average as CPU tensors, keyed like model.state_dict() ({} on non-owning ranks)."""
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}


@torch.no_grad()
def update_averages(states: Sequence[EMAState], module: torch.nn.Module, step: int, root: Any = None) -> bool:
    """Fold the weights after optimizer step `step` into each of `states` whose update is due, gathering
    the parameters once for all of them (ZeRO-3). All ranks call this together. Returns whether any updated."""
    due = [s for s in states if s.due(step)]
    if not due:
        return False
    with full_parameters(module, root=root):
        tensors = list(_named_tensors(module)) if any(s.shadow for s in due) else []
        for s in due:
            if not s.shadow:
                continue
            d = s.decay_at(step)
            for name, t in tensors:
                avg, new = s.shadow[name], s.part(t.detach())
                if avg.is_floating_point():
                    avg.lerp_(new.to(avg.device, avg.dtype), 1.0 - d)  # avg + (1-d)(t-avg)
                else:
                    avg.copy_(new)
    for s in due:
        s.last_step = step
        s.num_updates += 1
    return True


class EMA(L.Callback):
    """Lightning callback: updates the average after optimizer steps, validates with it, checkpoints it."""

    def __init__(
        self,
        decay: float = 0.999,
        warmup_steps: int = 0,
        every_n_steps: int = 1,
        use_for_eval: bool = True,
        update_on_cpu: bool = False,
    ) -> None:
        self.ema = EMAState(decay, warmup_steps, every_n_steps, on_cpu=update_on_cpu)
        self.use_for_eval = use_for_eval
        self._pending: dict[str, Tensor] | None = None  # average from a checkpoint, applied at fit start
        self._swapped_backup: dict[str, Tensor] | None = None

    @classmethod
    def from_config(cls, ema_cfg: Any) -> EMA:
        return cls(
            ema_cfg.decay,
            ema_cfg.warmup_steps,
            ema_cfg.every_n_steps,
            ema_cfg.use_for_eval,
            getattr(ema_cfg, "update_on_cpu", False),
        )

    @staticmethod
    def _root(trainer: L.Trainer) -> Any:
        return getattr(trainer.strategy, "model", None)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_fit_start: under DeepSpeed the checkpoint is restored after on_fit_start.
        if self._pending is not None:
            # Resumed: the checkpoint's average, on the ranks that own it.
            if self.ema.owns(pl_module):
                device = "cpu" if self.ema.on_cpu else pl_module.device
                self.ema.shadow = {k: v.to(device) for k, v in self._pending.items()}
            self._pending = None
        elif not self.ema.shadow:
            self.ema.init_from(pl_module, self._root(trainer))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts optimizer steps, so accumulation micro-batches do not update the average.
        self.ema.update(pl_module, trainer.global_step, self._root(trainer))

    # ---- evaluate with the average ---------------------------------------------------------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.use_for_eval and self.ema.last_step > 0 and not trainer.sanity_checking:
            self._swapped_backup = self.ema.snapshot(pl_module, self._root(trainer))
            self.ema.copy_to(pl_module, root=self._root(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped_backup is not None:
            self.ema.copy_to(pl_module, self._swapped_backup, root=self._root(trainer))
            self._swapped_backup = None

    @contextmanager
    def swapped(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
        """For sampling callbacks: run the block with the averaged weights."""
        if not self.use_for_eval or not (self.ema.shadow or is_zero3_partitioned(pl_module)):
            yield
            return
        with self.ema.swapped(pl_module, self._root(trainer)):
            yield

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema.load_state_dict(state_dict)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._swapped_backup is not None:
            # A checkpoint written during validation must hold the trained weights, not the average.
            checkpoint["state_dict"] = {
                **checkpoint.get("state_dict", {}),
                **{k: v.detach().cpu() for k, v in self._swapped_backup.items()},
            }
        if self.ema.shadow:
            checkpoint["ema_state_dict"] = self.ema.weights()

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        weights = checkpoint.get("ema_state_dict")
        if weights:
            self._pending = {k: v.detach().clone() for k, v in weights.items()}
