"""Whole parameters on demand, whatever the sharding (ZeRO-3 partitions, FSDP shards, or none)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


def is_zero3_partitioned(module: torch.nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the module's parameters across ranks."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _fsdp_root(module: torch.nn.Module, root: Any) -> Any:
    for candidate in (root, module):
        if isinstance(candidate, torch.nn.Module) and any(isinstance(m, FSDP) for m in candidate.modules()):
            return candidate
    return None


@contextmanager
def full_parameters(module: torch.nn.Module, modify: bool = False, root: Any = None) -> Iterator[None]:
    """Inside the block every parameter of `module` is whole on every rank.

    `modify=True`: changes made inside are kept. Under ZeRO-3 only rank 0's changes count (they are
    broadcast and re-partitioned on exit), so callers write the same values on rank 0. `root` is the
    strategy's wrapped model, needed for FSDP when the wrapper sits outside `module`.
    All ranks must enter the block together (it gathers).
    """
    if is_zero3_partitioned(module):
        import deepspeed  # heavy: only for ZeRO-3 partitioned modules

        with deepspeed.zero.GatheredParameters(
            list(module.parameters()), modifier_rank=0 if modify else None
        ):
            yield
        return
    fsdp = _fsdp_root(module, root)
    if fsdp is not None:

        with FSDP.summon_full_params(fsdp, writeback=modify, recurse=True):
            yield
        return
    with nullcontext():
        yield
