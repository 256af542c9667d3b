"""`trainer` section -> Lightning Trainer arguments. The only place that knows strategies.

The runtime calls `trainer_kwargs(cfg.trainer, cfg.data.batch_size)` and passes the result to
`lightning.Trainer(**kwargs, ...)`; families and networks never see DDP, FSDP or DeepSpeed.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from omegaconf import OmegaConf

from scalegen.distributed.batching import batch_plan, world_size
from scalegen.distributed.deepspeed import deepspeed_config, zero_stage
from scalegen.errors import UserError


def under_slurm() -> bool:
    """True inside a SLURM job step launched with srun (one task per device)."""
    return (
        "SLURM_JOB_ID" in os.environ
        and "SLURM_PROCID" in os.environ
        and "SLURM_NTASKS" in os.environ
        and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    )


def cluster_environment(trainer_cfg: Any) -> Any | None:
    """Lightning's SLURM environment when running under srun, else None (Lightning's default).

    Lightning's own auto-requeue is switched off: it checkpoints inside the signal handler, in the
    middle of whatever step each rank is in. scalegen's `Preemption` (runtime/preemption.py) instead agrees on the
    signal across ranks at a step boundary, checkpoints there and lets the batch script requeue.
    """
    if not under_slurm():
        return None

    return SLURMEnvironment(
        auto_requeue=False, requeue_signal=getattr(signal, str(trainer_cfg.requeue_signal))
    )


def strategy(trainer_cfg: Any, per_device_batch_size: int, world: int, family: type | None = None) -> Any:
    """The Lightning strategy object (or name) for `trainer.strategy`.

    `family` (the model's class) contributes its DDP settings: `ddp_find_unused_parameters = True` for a
    family whose backward passes leave some parameters without gradients (a GAN freezes one network
    per backward), so families never touch the strategy themselves."""
    name = str(trainer_cfg.strategy)
    env = cluster_environment(trainer_cfg)
    env_kw = {"cluster_environment": env} if env is not None else {}
    if zero_stage(name):
        accelerator = str(trainer_cfg.accelerator)

        if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
            raise UserError(
                f"trainer.strategy={name} needs GPUs: Lightning runs DeepSpeed on CUDA only. On CPU use "
                "trainer.strategy=ddp (scalegen checks its DeepSpeed config on CPU in tests/distributed)"
            )

        config = deepspeed_config(trainer_cfg, per_device_batch_size, world=world, for_lightning=True)
        fp16 = config.get("fp16", {})
        return DeepSpeedStrategy(
            config=config,
            loss_scale=fp16.get("loss_scale", 0.0),
            initial_scale_power=fp16.get("initial_scale_power", 16),
            loss_scale_window=fp16.get("loss_scale_window", 1000),
            hysteresis=fp16.get("hysteresis", 2),
            min_loss_scale=fp16.get("min_loss_scale", 1),
            **env_kw,
        )
    if name == "fsdp":

        return FSDPStrategy(
            sharding_strategy="FULL_SHARD",
            cpu_offload=bool(trainer_cfg.offload_parameters),
            state_dict_type="full",  # one ordinary state dict: load_model reads it
            **env_kw,
        )
    if name == "ddp" or (name == "auto" and world > 1):

        find_unused = bool(trainer_cfg.find_unused_parameters or getattr(family, "ddp_find_unused_parameters", False))
        return DDPStrategy(find_unused_parameters=find_unused, **env_kw)
    if trainer_cfg.offload_optimizer or trainer_cfg.offload_parameters:
        raise UserError(
            "trainer.offload_optimizer/offload_parameters need trainer.strategy=deepspeed_stage_N "
            "(or fsdp for parameters)"
        )
    return "auto"


def trainer_kwargs(trainer_cfg: Any, per_device_batch_size: int, optim_cfg: Any = None,
                   family: type | None = None) -> dict[str, Any]:
    """Lightning `Trainer` arguments for scale-out: `strategy` (an object carrying the SLURM cluster
    environment when under srun), `precision` and `accumulate_grad_batches`.

    Accumulation comes from `trainer.global_batch_size` when it is set (see `batching`); a global
    batch that does not divide raises `UserError` here, before anything runs. Accelerator, devices,
    num_nodes and gradient clipping go to the Trainer straight from the `trainer` section (under
    DeepSpeed the clipping value is also in the engine config, and Lightning leaves clipping to it).
    """

    world = world_size(trainer_cfg)
    plan = batch_plan(trainer_cfg, per_device_batch_size, optim_cfg, world=world)
    if (
        str(trainer_cfg.precision).startswith("16")
        and not zero_stage(str(trainer_cfg.strategy))
        and float(trainer_cfg.loss_scale) > 0
    ):
        raise UserError(
            "trainer.loss_scale (a fixed fp16 loss scale) is only honoured by DeepSpeed; "
            "with ddp/fsdp 16-mixed uses dynamic scaling (set trainer.loss_scale=0)"
        )
    return {
        "strategy": strategy(trainer_cfg, per_device_batch_size, world, family),
        "precision": str(trainer_cfg.precision),
        "accumulate_grad_batches": plan.accumulation,
    }


def scaled_optim(cfg: Any) -> Any:
    """`cfg.optim` with the peak learning rate scaled for this world size (`optim.scale_lr`); the recipe
    itself (saved with the run) keeps the rate it was tuned with."""

    plan = batch_plan(cfg.trainer, cfg.data.batch_size, cfg.optim)
    if plan.lr == float(cfg.optim.lr):
        return cfg.optim
    return OmegaConf.merge(cfg.optim, {"lr": plan.lr})
