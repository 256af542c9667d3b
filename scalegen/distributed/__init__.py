"""Scale-out: the only package that knows DDP, FSDP and DeepSpeed, and the batch-size arithmetic.

- `trainer_kwargs(trainer_cfg, per_device_batch_size)`: Lightning Trainer strategy/precision/accumulation.
- `scaled_optim(cfg)`: the optim section with the learning rate scaled for the world size.
- `batch_plan(...)`: accumulation, global batch and scaled learning rate (see `batching`).
- `deepspeed_config(trainer_cfg, per_device_batch_size)`: the DeepSpeed config dict.
- `consolidate_zero_checkpoint(path)`: one fp32 state dict from a sharded ZeRO checkpoint.
- `full_parameters(module)`: a context in which every parameter is whole on every rank (ZeRO-3, FSDP).
"""

from scalegen.distributed.batching import (
    BatchPlan,
    accumulation_steps,
    batch_plan,
    devices_per_node,
    scaled_lr,
    world_size,
)
from scalegen.distributed.deepspeed import (
    consolidate_zero_checkpoint,
    deepspeed_config,
    is_zero_checkpoint,
    zero_client_state,
    zero_stage,
)
from scalegen.distributed.gather import full_parameters
from scalegen.distributed.strategies import (
    cluster_environment,
    scaled_optim,
    strategy,
    trainer_kwargs,
    under_slurm,
)

__all__ = [
    "BatchPlan",
    "accumulation_steps",
    "batch_plan",
    "cluster_environment",
    "consolidate_zero_checkpoint",
    "deepspeed_config",
    "devices_per_node",
    "full_parameters",
    "is_zero_checkpoint",
    "scaled_lr",
    "scaled_optim",
    "strategy",
    "trainer_kwargs",
    "under_slurm",
    "world_size",
    "zero_client_state",
    "zero_stage",
]
