"""How the loader hands out batches: inline, from a prefetch thread, or from persistent workers.

Every way must give the same batches in the same order, leave the global RNG alone (a run resumed at an
epoch end draws what an uninterrupted one draws), and keep counting batches consumed, not decoded.
"""

from __future__ import annotations

import shutil
import threading
import warnings
from pathlib import Path

import pytest
import torch

from scalegen.config.schema import DataConfig
from scalegen.data import BadSampleWarning, DataError, build_datamodule
from scalegen.data.prefetch import prefetch
from scalegen.data.shards import iter_shard, tar_bytes


def _cfg(root: Path, workers: int = 0, prefetch: int = 0, **kw) -> DataConfig:
    return DataConfig(root=str(root), batch_size=100, num_workers=workers, prefetch=prefetch, shuffle_buffer=64,
                      seed=3, random_flip=True, random_crop_padding=2, prepare=False, **kw)


def _epochs(loader, n: int) -> list[list[tuple[list[str], torch.Tensor]]]:
    return [[(b["key"], b["x"].clone()) for b in loader] for _ in range(n)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(ka == kb and torch.equal(xa, xb) for (ka, xa), (kb, xb) in zip(a, b))


@pytest.mark.parametrize("workers,depth", [(0, 2), (1, 0)])
def test_prefetch_thread_and_persistent_workers_give_the_inline_batches(digits_root: Path, workers, depth) -> None:
    inline = _epochs(build_datamodule(_cfg(digits_root)).train_dataloader(), 2)
    if workers:  # a worker plans as worker 0 of 1, like the inline stream: the same batches
        other = _epochs(build_datamodule(_cfg(digits_root, workers=workers)).train_dataloader(), 2)
    else:
        other = _epochs(build_datamodule(_cfg(digits_root, prefetch=depth)).train_dataloader(), 2)
    assert not _same(inline[0], inline[1])  # epochs differ (shuffle), and the persistent worker follows
    assert _same(inline[0], other[0]) and _same(inline[1], other[1])


@pytest.mark.parametrize("workers,depth", [(0, 0), (0, 2), (2, 0)])
def test_iterating_never_draws_from_the_global_generator(digits_root: Path, workers, depth) -> None:
    """A DataLoader without its own generator draws its workers' seed from the global torch generator at every
    epoch start, which made a run resumed exactly at an epoch end one draw off."""
    loader = build_datamodule(_cfg(digits_root, workers=workers, prefetch=depth)).train_dataloader()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for _ in range(2):
        for _ in loader:
            pass
    assert torch.equal(torch.get_rng_state(), before)


def test_prefetched_but_unconsumed_batches_are_not_counted(digits_root: Path) -> None:
    dm = build_datamodule(_cfg(digits_root, prefetch=4))
    loader = dm.train_dataloader()
    it = iter(loader)
    taken = [next(it)["key"] for _ in range(3)]
    assert dm.state_dict()["train"]["consumed"] == 3  # the thread has decoded more by now
    fresh = build_datamodule(_cfg(digits_root))
    fresh.load_state_dict(dm.state_dict())
    expected = [b["key"] for b in build_datamodule(_cfg(digits_root)).train_dataloader()]
    assert taken + [b["key"] for b in fresh.train_dataloader()] == expected


def test_prefetch_thread_stops_when_the_consumer_stops() -> None:
    produced: list[int] = []

    def items():
        for i in range(10_000):
            produced.append(i)
            yield i

    gen = prefetch(items(), depth=2)
    assert [next(gen) for _ in range(3)] == [0, 1, 2]
    gen.close()
    for t in threading.enumerate():
        if t.name == "scalegen-prefetch":
            t.join(timeout=5)
    assert not any(t.name == "scalegen-prefetch" for t in threading.enumerate())
    assert len(produced) < 10


def _corrupt(digits_root: Path, dest: Path) -> str:
    shutil.copytree(digits_root, dest, ignore=shutil.ignore_patterns(".*"))
    path = dest / "train-000000.tar"
    samples = list(iter_shard(str(path)))
    samples[0]["png"] = b"\x89PNG\r\n\x1a\n not an image"
    path.write_bytes(tar_bytes(samples))
    return samples[0]["__key__"]


def test_prefetch_thread_warns_and_raises_in_the_consumer(digits_root: Path, tmp_path: Path) -> None:
    bad = _corrupt(digits_root, tmp_path / "d")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(build_datamodule(_cfg(tmp_path / "d", prefetch=2)).train_dataloader())
    ours = [w for w in caught if issubclass(w.category, BadSampleWarning)]
    assert len(ours) == 1 and bad in str(ours[0].message)
    assert sum(len(b["key"]) for b in batches) == 1346 and int(batches[-1]["skipped"]) == 1
    with pytest.raises(DataError, match=bad):
        list(build_datamodule(_cfg(tmp_path / "d", prefetch=2, on_bad_sample="raise")).train_dataloader())
