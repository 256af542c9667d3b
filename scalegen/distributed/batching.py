"""Batch-size arithmetic: a fixed global batch across world sizes, and the learning-rate rule.

The global batch is what a recipe's optimization was tuned for, so it stays fixed when the same
recipe runs on one CPU process or on 4 nodes x 8 GPUs; only gradient accumulation changes:

    accumulation = global_batch_size / (per_device_batch_size * devices * num_nodes)

which must be a whole number. Without `trainer.global_batch_size` the recipe's
`trainer.accumulate_grad_batches` is used as given and the global batch follows from it.

When the global batch differs from the batch the learning rate was tuned for
(`optim.reference_batch_size`), `optim.scale_lr` says how the peak rate follows it:
`linear` (lr * B / B_ref, Goyal et al. 2017, for SGD-like training), `sqrt`
(lr * sqrt(B / B_ref), the usual rule for Adam), or `none`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from scalegen.errors import UserError


def devices_per_node(trainer_cfg: Any) -> int:
    """Processes per node that `trainer.devices` asks for (an int, a list of ids, or "auto"/-1)."""
    devices = trainer_cfg.devices
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices == "auto" or devices == -1:
        accelerator = str(trainer_cfg.accelerator)
        if accelerator in ("auto", "gpu", "cuda"):

            if torch.cuda.is_available():
                return torch.cuda.device_count()
        # Under SLURM one task per device: the tasks on this node are the devices.
        ntasks = os.environ.get("SLURM_NTASKS_PER_NODE")
        return int(ntasks) if ntasks and ntasks.isdigit() else 1
    if not isinstance(devices, int) or devices < 1:
        raise UserError(f"trainer.devices={devices!r} must be a positive int, a list of device ids or 'auto'")
    return devices


def world_size(trainer_cfg: Any) -> int:
    """Total training processes: devices per node x nodes."""
    if int(trainer_cfg.num_nodes) < 1:
        raise UserError(f"trainer.num_nodes={trainer_cfg.num_nodes} must be >= 1")
    return devices_per_node(trainer_cfg) * int(trainer_cfg.num_nodes)


def accumulation_steps(global_batch_size: int, per_device_batch_size: int, world: int) -> int:
    """Micro-batches accumulated per optimizer step so the global batch is exactly `global_batch_size`."""
    if per_device_batch_size < 1 or world < 1 or global_batch_size < 1:
        raise UserError(
            f"batch sizes must be positive (global {global_batch_size}, per device {per_device_batch_size}, "
            f"world size {world})"
        )
    per_step = per_device_batch_size * world
    if global_batch_size % per_step:
        lower = max(per_step, global_batch_size // per_step * per_step)
        raise UserError(
            f"trainer.global_batch_size={global_batch_size} is not a multiple of data.batch_size x world "
            f"= {per_device_batch_size} x {world} = {per_step}; set trainer.global_batch_size to a multiple "
            f"(e.g. {lower} or {lower + per_step}) or change data.batch_size"
        )
    return global_batch_size // per_step


def scaled_lr(lr: float, scale_lr: str, global_batch_size: int, reference_batch_size: int) -> float:
    """The peak learning rate for `global_batch_size`, from one tuned at `reference_batch_size`."""
    if scale_lr == "none" or reference_batch_size <= 0:
        return lr
    ratio = global_batch_size / reference_batch_size
    if scale_lr == "linear":
        return lr * ratio
    if scale_lr == "sqrt":
        return lr * math.sqrt(ratio)
    raise UserError(f"optim.scale_lr={scale_lr!r} is not allowed; choose one of none, linear, sqrt")


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step is made up, for a given config and world size."""

    world_size: int  # training processes (devices x nodes)
    per_device_batch_size: int  # examples per process per forward pass (data.batch_size)
    accumulation: int  # micro-batches per optimizer step
    global_batch_size: int  # examples per optimizer step, all processes together
    lr: float  # peak learning rate after optim.scale_lr

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch_size} = {self.per_device_batch_size} per device x "
            f"{self.world_size} processes x {self.accumulation} accumulation; peak lr {self.lr:g}"
        )


def batch_plan(
    trainer_cfg: Any, per_device_batch_size: int, optim_cfg: Any = None, world: int | None = None
) -> BatchPlan:
    """Accumulation, global batch and scaled learning rate for `trainer_cfg` at `world` processes."""
    world = world_size(trainer_cfg) if world is None else world
    per_device_batch_size = int(per_device_batch_size)
    if trainer_cfg.global_batch_size is not None:
        global_batch = int(trainer_cfg.global_batch_size)
        accumulation = accumulation_steps(global_batch, per_device_batch_size, world)
    else:
        accumulation = int(trainer_cfg.accumulate_grad_batches)
        if accumulation < 1:
            raise UserError(f"trainer.accumulate_grad_batches={accumulation} must be >= 1")
        global_batch = per_device_batch_size * world * accumulation
    lr = float("nan")
    if optim_cfg is not None:
        lr = scaled_lr(
            float(optim_cfg.lr), str(optim_cfg.scale_lr), global_batch, int(optim_cfg.reference_batch_size)
        )
    return BatchPlan(world, per_device_batch_size, accumulation, global_batch, lr)
