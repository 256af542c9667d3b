"""Splitting evaluation work across ranks and gathering it back exactly.

Every rank takes a contiguous block of the global example range (`shard_bounds`: sizes differ by at
most one, in rank order), computes per-example values for its block, and `gather_rows` concatenates
the blocks in rank order. Blocks are padded to a common length for the collective and the padding is
cut off again, so the result has exactly one row per global example, in the global order, on every
rank: no example is dropped or duplicated at an uneven last batch. On a single process every
function is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous block of n examples; the first n % world ranks get one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(local: Tensor) -> Tensor:
    """Concatenate every rank's rows [n_r, ...] in rank order (on every rank), exactly, on CPU."""
    if not is_distributed():
        return local.detach().cpu()
    world = dist.get_world_size()
    device = _comm_device()
    local = local.detach().to(device)
    n = torch.tensor([local.shape[0]], device=device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's object on every rank (e.g. the results rank 0 computed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
