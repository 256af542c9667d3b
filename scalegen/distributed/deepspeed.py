"""The DeepSpeed configuration scalegen generates from a recipe's `trainer` section, and ZeRO
checkpoint consolidation through DeepSpeed's own utilities.

The same dict drives both paths: Lightning's `DeepSpeedStrategy(config=...)` on GPUs (which fills in
accumulation itself), and a bare `deepspeed.initialize(config=...)` engine (the CPU check in
tests/distributed/). Field meanings: https://www.deepspeed.ai/docs/config-json/
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from scalegen.distributed.batching import batch_plan
from scalegen.errors import UserError

DEEPSPEED_STRATEGIES = {"deepspeed_stage_1": 1, "deepspeed_stage_2": 2, "deepspeed_stage_3": 3}


def zero_stage(strategy: str) -> int:
    """ZeRO stage of a `trainer.strategy` name (0 when it is not a DeepSpeed strategy)."""
    return DEEPSPEED_STRATEGIES.get(str(strategy), 0)


def precision_section(trainer_cfg: Any) -> dict[str, Any]:
    """Precision entries of the DeepSpeed config; {} for fp32.

    - `bf16-mixed`: fp32 weights, forward under `torch.autocast(bfloat16)` (DeepSpeed's
      `torch_autocast`), i.e. the same meaning as Lightning's bf16-mixed; families need no casts.
      `bf16.enabled: false` is written out so Lightning does not add its own bf16 section.
    - `bf16-true`: DeepSpeed's bf16 mode: bf16 weights, fp32 master weights in the optimizer.
    - `16-mixed`: DeepSpeed's fp16 mode with loss scaling (dynamic when `trainer.loss_scale` is 0):
      fp16 weights, so a family must cast its inputs to its parameters' dtype.
    """
    precision = str(trainer_cfg.precision)
    if precision == "bf16-mixed":
        return {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}, "bf16": {"enabled": False}}
    if precision.startswith("bf16"):
        return {"bf16": {"enabled": True}}
    if precision.startswith("16"):
        # loss_scale 0 selects DeepSpeed's dynamic loss scaler, which skips a step on overflow.
        return {
            "fp16": {
                "enabled": True,
                "loss_scale": float(trainer_cfg.loss_scale),
                "initial_scale_power": int(trainer_cfg.initial_scale_power),
                "loss_scale_window": int(trainer_cfg.loss_scale_window),
                "hysteresis": int(trainer_cfg.hysteresis),
                "min_loss_scale": float(trainer_cfg.min_loss_scale),
            }
        }
    return {}


def deepspeed_config(
    trainer_cfg: Any,
    per_device_batch_size: int,
    *,
    world: int | None = None,
    stage: int | None = None,
    for_lightning: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config dict for `trainer_cfg` (strategy deepspeed_stage_N, or `stage` given).

    `for_lightning=True` leaves out the batch arithmetic that Lightning's strategy sets itself
    (it refuses a config with `gradient_accumulation_steps`).
    """
    stage = zero_stage(trainer_cfg.strategy) if stage is None else stage
    if stage not in (1, 2, 3):
        raise UserError(
            f"trainer.strategy={trainer_cfg.strategy!r} is not a DeepSpeed strategy "
            "(deepspeed_stage_1, deepspeed_stage_2 or deepspeed_stage_3)"
        )
    if trainer_cfg.offload_parameters and stage != 3:
        raise UserError(
            "trainer.offload_parameters=true needs ZeRO stage 3 (trainer.strategy=deepspeed_stage_3); "
            "stages 1-2 can offload only the optimizer (trainer.offload_optimizer=true)"
        )
    plan = batch_plan(trainer_cfg, per_device_batch_size, world=world)
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,  # one gradient buffer: less fragmentation
        "overlap_comm": stage > 1,  # overlap gradient reduction with the backward pass
        "reduce_scatter": True,  # average gradients with reduce-scatter instead of all-reduce
        "allgather_bucket_size": 200_000_000,  # elements per all-gather bucket
        "reduce_bucket_size": 200_000_000,  # elements per reduce bucket
    }
    if trainer_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if trainer_cfg.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "zero_optimization": zero,
        # scalegen builds torch optimizers (scalegen.optim); allow them under ZeRO and with offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": float(trainer_cfg.gradient_clip_val or 0.0),
        "steps_per_print": 10**9,  # scalegen logs itself
        "wall_clock_breakdown": False,
        **precision_section(trainer_cfg),
    }
    if not for_lightning:
        config["train_micro_batch_size_per_gpu"] = plan.per_device_batch_size
        config["gradient_accumulation_steps"] = plan.accumulation
        config["train_batch_size"] = plan.global_batch_size
    return config


def is_zero_checkpoint(path: str | Path) -> bool:
    """A DeepSpeed (ZeRO) checkpoint is a folder with a `latest` tag file or `*_optim_states.pt` shards."""
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or any(path.rglob("*optim_states.pt")))


def zero_world_size(path: str | Path) -> int:
    """Processes that wrote a ZeRO checkpoint folder: one optimizer-state shard each (data parallel)."""
    return len({p.name for p in Path(path).rglob("*optim_states.pt")})


def check_zero_resume(path: str | Path, world: int) -> None:
    """Refuse (one line, before the job starts) to resume a ZeRO checkpoint at another world size: its
    optimizer state is partitioned across the processes that wrote it, and DeepSpeed loads such a folder
    only at that size. Another size goes through DeepSpeed's universal checkpoint, which scalegen does not
    load (Lightning's DeepSpeed strategy has no option for it)."""
    saved = zero_world_size(path)
    if saved and saved != world:
        raise UserError(
            f"cannot resume ZeRO checkpoint {path} (written by {saved} processes) with {world}: ZeRO shards the "
            f"optimizer state per process. Resume with {saved} processes (trainer.devices x trainer.num_nodes), or "
            f"convert it with `python -m deepspeed.checkpoint.ds_to_universal --input_folder {path}/checkpoint "
            "--output_folder OUT` and load OUT through DeepSpeed's universal checkpoint option "
            '("checkpoint": {"load_universal": true}), which scalegen does not pass; or start a new run from its '
            "weights (scalegen release, then finetune.init_from; the optimizer state starts afresh)"
        )


def consolidate_zero_checkpoint(path: str | Path, tag: str | None = None) -> dict[str, Any]:
    """One fp32 state dict from a sharded ZeRO checkpoint folder, through `deepspeed.utils.zero_to_fp32`.

    Works for the folder written by `engine.save_checkpoint(dir)` and for Lightning's DeepSpeed
    checkpoints (a `.ckpt` folder holding a `checkpoint/` tag); Lightning's wrapper prefix is removed.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # heavy: ZeRO folders only

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a ZeRO checkpoint folder")
    if tag is None and not (path / "latest").is_file():
        # Lightning writes the tag folder `checkpoint` without a `latest` file.
        tags = [p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*model_states.pt"))]
        if len(tags) != 1:
            raise UserError(
                f"cannot tell which tag of ZeRO checkpoint {path} to use (found {tags}); pass tag="
            )
        tag = tags[0]
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    prefix = "_forward_module."
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v.float() for k, v in state.items()}


def zero_client_state(path: str | Path, tag: str | None = None) -> dict[str, Any]:
    """Everything Lightning stored beside the weights in a ZeRO checkpoint (callbacks, EMA, scalegen config).

    Read with `weights_only=True` like every other checkpoint here. (The optimizer shards, which hold
    DeepSpeed's own classes, are only read by DeepSpeed's `zero_to_fp32` during consolidation.)
    """

    path = Path(path)
    tag_dir = path / tag if tag else None
    if tag_dir is None:
        latest = path / "latest"
        tag_dir = (
            path / latest.read_text().strip()
            if latest.is_file()
            else next(p for p in path.iterdir() if p.is_dir() and any(p.glob("*model_states.pt")))
        )
    files = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise UserError(f"no model states in ZeRO checkpoint {tag_dir}")
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    skip = {
        "module",
        "optimizer",
        "lr_scheduler",
        "csr_tensor_module_names",
        "skipped_steps",
        "global_steps",
        "dp_world_size",
        "mp_world_size",
        "buffer_names",
        "param_shapes",
        "frozen_param_shapes",
        "shared_params",
        "frozen_param_fragments",
        "ds_config",
        "ds_version",
    }
    return {k: v for k, v in state.items() if k not in skip}
