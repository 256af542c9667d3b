"""Exact-once splitting across ranks and workers with equal step counts, uneven shards included."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalegen.config.schema import DataConfig
from scalegen.data import build_datamodule
from scalegen.data.pipeline import ShardStream
from scalegen.data.split import plan_worker, steps_per_epoch


def _plan_all(counts, world, workers, batch, epoch=0, shuffle=True):
    """{rank: [(worker, plan)]} for every rank and worker."""
    return {
        r: [
            plan_worker(
                counts,
                rank=r,
                world=world,
                worker=w,
                num_workers=workers,
                batch_size=batch,
                epoch=epoch,
                seed=7,
                shuffle=shuffle,
            )
            for w in range(workers)
        ]
        for r in range(world)
    }


@settings(max_examples=300, deadline=None)
@given(
    counts=st.lists(st.integers(1, 60), min_size=1, max_size=9),
    world=st.integers(1, 4),
    workers=st.integers(1, 4),
    batch=st.integers(1, 17),
    epoch=st.integers(0, 3),
)
def test_plan_covers_every_sample_once_with_equal_steps(counts, world, workers, batch, epoch) -> None:
    total = sum(counts)
    if total < world:
        return
    seen: Counter[tuple[int, int]] = Counter()
    steps = set()
    for plans in _plan_all(counts, world, workers, batch, epoch).values():
        rank_batches = []
        for plan in plans:
            n = 0
            for sl in plan.slices:
                assert 0 <= sl.start < sl.stop <= counts[sl.shard]
                seen.update((sl.shard, i) for i in range(sl.start, sl.stop))
                n += sl.stop - sl.start
            assert sum(plan.batch_sizes) == n  # a worker batches exactly what it reads
            rank_batches += plan.batch_sizes
        steps.add(len(rank_batches))
        assert max(rank_batches) <= batch and max(rank_batches) - min(rank_batches) <= 1
    assert steps == {steps_per_epoch(total, world, batch)} == {math.ceil(math.ceil(total / world) / batch)}
    assert set(seen.values()) == {1} and len(seen) == total  # exactly once


def test_shuffled_shard_order_changes_with_epoch_but_not_rank() -> None:
    counts = [5] * 12
    first = lambda e: [sl.shard for p in _plan_all(counts, 1, 1, 4, e)[0] for sl in p.slices]  # noqa: E731
    assert sorted(first(0)) == list(range(12)) and first(0) != first(1) and first(0) == first(0)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_read_every_digit_once(digits_root: Path, world: int, workers: int) -> None:
    """Real shards (500/500/347 samples: uneven), simulated ranks, real DataLoader workers."""
    cfg = DataConfig(root=str(digits_root), batch_size=64, num_workers=workers, shuffle_buffer=100, prepare=False)
    dm = build_datamodule(cfg)
    urls, counts = dm._shards("train")
    keys: list[str] = []
    steps = []
    for rank in range(world):
        loader = dm.train_dataloader()
        loader.stream = ShardStream(urls, counts, loader.stream.opts, rank=rank, world=world)
        batches = list(loader)
        steps.append(len(batches))
        assert len(batches) == len(loader)
        keys += [k for b in batches for k in b["key"]]
    assert len(set(steps)) == 1, f"ranks ran different step counts {steps}"
    assert len(keys) == 1347 and len(set(keys)) == 1347


def test_batch_size_one_with_an_uneven_split_keeps_steps_equal(digits_root: Path) -> None:
    """150 val samples over 4 ranks at batch 1: ranks of 37 samples get one stand-in step to match 38."""
    dm = build_datamodule(DataConfig(root=str(digits_root), batch_size=1, prepare=False))
    urls, counts = dm._shards("val")
    keys, steps, replaced = [], [], []
    for rank in range(4):
        loader = dm.val_dataloader()
        loader.stream = ShardStream(urls, counts, loader.stream.opts, rank=rank, world=4)
        batches = [b["key"] for b in loader]
        steps.append(len(batches))
        replaced.append(loader.replaced)
        keys += [k for b in batches for k in b]
    assert steps == [38] * 4 and len(set(keys)) == 150 and len(keys) == 152
    assert sorted(replaced) == [0, 0, 1, 1]  # counted as stand-ins
