"""Exact-once assignment of an epoch's samples to ranks, workers and batches.

Because the manifest records how many samples each shard holds, the whole epoch can be planned
before reading a byte, identically on every rank:

1. the shards are put in an epoch order (shuffled with `seed + epoch` when training) and their
   samples numbered 0..N-1 in that order;
2. rank r gets the contiguous range [r*N//R, (r+1)*N//R): n_r samples, differing by at most one;
3. every rank runs S = ceil(ceil(N/R) / B) steps, and splits its n_r samples into S batches whose
   sizes differ by at most one. No sample is dropped or duplicated, and no rank waits for another
   at the end of the epoch;
4. rank r's S batches are cut into W contiguous blocks, one per DataLoader worker, so a worker
   reads a contiguous run of samples (one seek into its first shard at most). The DataLoader
   interleaves workers round-robin, so the g-th batch a rank receives is batch g // W of worker g % W.

A sample's *position* is its index in the split's shards concatenated in manifest order (shard offset +
index in the shard), which no world size changes. The rest of an epoch resumed at another world size is
planned the same way over the positions not yet `done` (`exclude`): the epoch order with those removed,
re-split over the new ranks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Slice:
    shard: int  # index into the split's shard list
    start: int  # first sample (position within the shard)
    stop: int  # one past the last


@dataclass(frozen=True)
class WorkerPlan:
    slices: tuple[Slice, ...]  # what this worker reads, in order
    batch_sizes: tuple[int, ...]  # how it groups what it reads; sum == samples in slices


def shard_order(counts: Sequence[int], epoch: int, seed: int, shuffle: bool) -> list[int]:
    """The order shards are visited in this epoch; the same on every rank and worker."""
    order = list(range(len(counts)))
    if shuffle:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def rank_range(total: int, rank: int, world: int) -> tuple[int, int]:
    return rank * total // world, (rank + 1) * total // world


def steps_per_epoch(total: int, world: int, batch_size: int) -> int:
    """Steps every rank takes: enough for the largest rank's share at `batch_size` per step."""
    return math.ceil(math.ceil(total / world) / batch_size) if total else 0


def split_evenly(n: int, parts: int) -> list[int]:
    """n items in `parts` parts whose sizes differ by at most one (larger first)."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def worker_batch_range(steps: int, worker: int, num_workers: int) -> tuple[int, int]:
    sizes = split_evenly(steps, num_workers)
    start = sum(sizes[:worker])
    return start, start + sizes[worker]


def plan_worker(
    counts: Sequence[int],
    *,
    rank: int,
    world: int,
    worker: int,
    num_workers: int,
    batch_size: int,
    epoch: int = 0,
    seed: int = 0,
    shuffle: bool = False,
    exclude: np.ndarray | None = None,
) -> WorkerPlan:
    """What one (rank, worker) reads in one epoch and how it batches it (see the module docstring);
    `exclude`: sorted positions already seen this epoch, left out of the plan (a resumed epoch)."""
    segments = epoch_segments(counts, shard_order(counts, epoch, seed, shuffle), exclude)
    total = sum(sl.stop - sl.start for sl in segments)
    steps = steps_per_epoch(total, world, batch_size)
    lo, hi = rank_range(total, rank, world)
    # A rank with fewer samples than steps (only possible with tiny batches) gets some empty batches;
    # the pipeline fills those by repeating its latest sample so that step counts stay equal.
    sizes = split_evenly(hi - lo, steps) if steps else []
    b0, b1 = worker_batch_range(steps, worker, num_workers)
    first = lo + sum(sizes[:b0])
    last = first + sum(sizes[b0:b1])
    return WorkerPlan(
        slices=tuple(_slices(segments, first, last)),
        batch_sizes=tuple(sizes[b0:b1]),
    )


def epoch_segments(counts: Sequence[int], order: Sequence[int], exclude: np.ndarray | None = None) -> list[Slice]:
    """The epoch's samples in epoch order as runs within shards: whole shards, minus `exclude`d positions."""
    offsets = np.cumsum([0, *counts])
    out = []
    for shard in order:
        lo, hi = int(offsets[shard]), int(offsets[shard + 1])
        gone = [] if exclude is None else exclude[np.searchsorted(exclude, lo):np.searchsorted(exclude, hi)] - lo
        start = 0
        for g in (*(int(x) for x in gone), hi - lo):
            if g > start:
                out.append(Slice(shard, start, g))
            start = g + 1
    return out


def _slices(segments: Sequence[Slice], first: int, last: int) -> list[Slice]:
    """Cut the sample range [first, last) of the segments' concatenation into per-shard slices."""
    out, offset = [], 0
    for seg in segments:
        n = seg.stop - seg.start
        a, b = max(first, offset), min(last, offset + n)
        if a < b:
            out.append(Slice(seg.shard, seg.start + a - offset, seg.start + b - offset))
        offset += n
        if offset >= last:
            break
    return out


def positions(counts: Sequence[int], slices: Sequence[Slice]) -> list[int]:
    """The positions (see the module docstring) of the samples in `slices`, in order."""
    offsets = np.cumsum([0, *counts])
    return [int(offsets[sl.shard]) + i for sl in slices for i in range(sl.start, sl.stop)]


def pack_positions(done: np.ndarray, total: int) -> str:
    """Positions -> a bitmap of `total` bits as hex ("" when none): what a checkpoint stores (N/4 characters at
    most; a str, which `torch.load(weights_only=True)` reads and `==` compares)."""
    if not len(done):
        return ""
    mask = np.zeros(total, dtype=bool)
    mask[done] = True
    return np.packbits(mask).tobytes().hex()


def unpack_positions(bits: str, total: int) -> np.ndarray:
    """A bitmap from `pack_positions` -> the sorted positions."""
    if not bits:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.unpackbits(np.frombuffer(bytes.fromhex(bits), dtype=np.uint8), count=total))


def batches_before(consumed: int, worker: int, num_workers: int) -> int:
    """How many of this worker's batches are among the first `consumed` a rank received (round-robin)."""
    return max(0, (consumed - worker + num_workers - 1) // num_workers)
