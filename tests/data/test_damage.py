"""Damaged data costs only itself (issue 21 §2): one shard truncated at 40 %, 4 KiB of random bytes in the
middle of another, a third emptied. Over the two ranks of an epoch the keys seen are exactly the undamaged
ones, every planned slot is filled (good samples stand in for lost ones), and no sample is seen more than
twice. The undamaged keys are computed independently, from the byte ranges Python's `tarfile` gives for
every member of the intact shards."""

from __future__ import annotations

import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from scalegen.config.schema import DataConfig
from scalegen.data import build_datamodule, prepare_dataset
from scalegen.data.pipeline import ShardStream


def _member_ranges(shard: Path) -> dict[str, list[tuple[int, int]]]:
    """key -> the byte ranges (header and padded data) of the sample's members."""
    out: dict[str, list[tuple[int, int]]] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            base = m.name.rsplit("/", 1)[-1]
            key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
            out.setdefault(key, []).append((m.offset, m.offset_data + m.size + (-m.size % 512)))
    return out


def _damage(root: Path, names: tuple[str, str, str], seed: int = 0) -> set[str]:
    """Damage three shards in place; returns the keys none of whose bytes were touched (all shards)."""
    truncated, garbled, emptied = (root / n for n in names)
    ranges = {p.name: _member_ranges(p) for p in sorted(root.glob("train-*.tar"))}
    cut = int(truncated.stat().st_size * 0.4)
    data = bytearray(garbled.read_bytes())
    at = len(data) // 2 + 100  # not on a block boundary
    data[at : at + 4096] = random.Random(seed).randbytes(4096)
    bad = {truncated.name: lambda a, b: b > cut, garbled.name: lambda a, b: a < at + 4096 and b > at,
           emptied.name: lambda a, b: True}
    truncated.write_bytes(truncated.read_bytes()[:cut])
    garbled.write_bytes(bytes(data))
    emptied.write_bytes(b"")
    return {key for shard, keys in ranges.items() for key, spans in keys.items()
            if shard not in bad or not any(bad[shard](a, b) for a, b in spans)}


def _epoch(root: Path, world: int, cache: bool, batch_size: int) -> list[dict]:
    cfg = DataConfig(root=str(root), batch_size=batch_size, shuffle_buffer=500, seed=5, prepare=False,
                     cache_bytes=(1 << 30) if cache else 0)
    dm = build_datamodule(cfg)
    urls, counts = dm.shards("train")
    ranks = []
    for rank in range(world):
        loader = dm.train_dataloader()
        loader.stream = ShardStream(urls, counts, loader.stream.opts, rank=rank, world=world)
        assert loader.cached == cache
        batches = [b["key"] for b in loader]
        ranks.append({"keys": [k for b in batches for k in b], "steps": len(batches), "sizes": list(map(len, batches)),
                      "skipped": loader.skipped, "replaced": loader.replaced, "planned": len(loader)})
    return ranks


def _check(root: Path, undamaged: set[str], total: int, cache: bool, batch_size: int) -> None:
    ranks = _epoch(root, 2, cache, batch_size)
    keys = [k for r in ranks for k in r["keys"]]
    visits = Counter(keys)
    assert set(visits) == undamaged  # every undamaged sample, and nothing damaged
    assert max(visits.values()) <= 2  # no sample more than twice
    assert len(keys) == total  # every planned slot filled: no batch repeated, none short
    assert ranks[0]["steps"] == ranks[1]["steps"] == ranks[0]["planned"]  # the ranks stay in lockstep
    lost = total - len(undamaged)
    assert sum(r["skipped"] for r in ranks) == lost  # each damaged sample counted once
    assert sum(r["replaced"] for r in ranks) == lost == sum(n - 1 for n in visits.values())


@pytest.fixture(scope="module")
def digits_small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits100")
    prepare_dataset("digits", root, shard_size=100, progress=False)  # 14 training shards
    return root


@pytest.mark.parametrize("cache", [True, False])
def test_three_damages_on_digits_cost_only_the_damaged_samples(digits_small_shards: Path, tmp_path: Path,
                                                               cache: bool) -> None:
    root = tmp_path / "d"
    shutil.copytree(digits_small_shards, root, ignore=shutil.ignore_patterns(".*"))
    undamaged = _damage(root, ("train-000003.tar", "train-000007.tar", "train-000011.tar"))
    assert 1347 - 100 - 60 - 4 <= len(undamaged) <= 1347 - 100 - 60 - 1  # ~60 truncated, 1-4 garbled
    # Streaming fills short batches from a reservoir of 4 batches of good samples: batch 64 covers this damage.
    _check(root, undamaged, 1347, cache, batch_size=64)
    if cache:  # decoded once, a resume continues exactly, stand-ins included
        cfg = DataConfig(root=str(root), batch_size=64, seed=5, prepare=False)
        full = [(b["key"], int(b["replaced"])) for b in build_datamodule(cfg).train_dataloader()]
        dm = build_datamodule(cfg)
        it = iter(dm.train_dataloader())
        first = [next(it)["key"] for _ in range(5)]
        resumed = build_datamodule(cfg)
        resumed.load_state_dict(dm.state_dict())
        rest = [(b["key"], int(b["replaced"])) for b in resumed.train_dataloader()]
        assert first == [k for k, _ in full[:5]] and [k for k, _ in rest] == [k for k, _ in full[5:]]
        assert rest[-1][1] == full[-1][1]  # the running count of stand-ins continues from the checkpoint


@pytest.mark.slow
def test_three_damages_on_mnist_cost_only_the_damaged_samples(shared_datasets: Path, tmp_path: Path) -> None:
    root = tmp_path / "mnist"
    prepare_dataset("mnist", root, source=str(shared_datasets / "mnist"), progress=False)
    undamaged = _damage(root, ("train-000002.tar", "train-000005.tar", "train-000008.tar"))
    assert 55000 - 5000 - 3000 - 4 <= len(undamaged) <= 55000 - 5000 - 3000 - 1
    _check(root, undamaged, 55000, cache=True, batch_size=128)
