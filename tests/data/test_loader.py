"""How the loader hands out batches: decoded once and batched from memory, streamed inline, or streamed from
persistent workers.

Streaming inline and from workers must give the same batches in the same order; every way must visit every
sample once per epoch, leave the global RNG alone (a run resumed at an epoch end draws what an uninterrupted
one draws), and resume exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scalegen.config.schema import DataConfig
from scalegen.data import build_datamodule


def _cfg(root: Path, workers: int = 0, cache: bool = False, **kw) -> DataConfig:
    return DataConfig(root=str(root), batch_size=100, num_workers=workers, shuffle_buffer=64, seed=3,
                      random_flip=True, random_crop_padding=2, prepare=False, cache_bytes=(1 << 30) * cache, **kw)


def _epochs(loader, n: int) -> list[list[tuple[list[str], torch.Tensor]]]:
    return [[(b["key"], b["x"].clone()) for b in loader] for _ in range(n)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(ka == kb and torch.equal(xa, xb) for (ka, xa), (kb, xb) in zip(a, b))


def test_persistent_workers_give_the_inline_batches(digits_root: Path) -> None:
    inline = _epochs(build_datamodule(_cfg(digits_root)).train_dataloader(), 2)
    other = _epochs(build_datamodule(_cfg(digits_root, workers=1)).train_dataloader(), 2)
    assert not _same(inline[0], inline[1])  # epochs differ (shuffle), and the persistent worker follows
    assert _same(inline[0], other[0]) and _same(inline[1], other[1])


def test_decoded_once_epochs_are_permutations_of_the_split(digits_root: Path) -> None:
    loader = build_datamodule(_cfg(digits_root, cache=True)).train_dataloader()
    assert loader.cached and not build_datamodule(_cfg(digits_root)).train_dataloader().cached
    epochs = _epochs(loader, 3)
    decoded = loader.decoded
    for e in epochs:
        keys = [k for ks, _ in e for k in ks]
        assert len(keys) == len(set(keys)) == 1347 and len(e) == 14
    assert loader.decoded is decoded  # decoded once, kept for later epochs
    assert not _same(epochs[0], epochs[1]) and not _same(epochs[1], epochs[2])
    # Pixels: the cached sample plus the random crop/flip equal what streaming decodes for that key.
    plain = {k: x for b in build_datamodule(DataConfig(root=str(digits_root), batch_size=500, prepare=False,
                                                       cache_bytes=0)).train_dataloader()
             for k, x in zip(b["key"], b["x"])}
    ks, xs = epochs[0][0]
    for k, x in zip(ks, xs):  # each a reflect-padded crop of the plain image, maybe mirrored
        p = torch.nn.functional.pad(plain[k][None].float(), (2, 2, 2, 2), mode="reflect")[0]
        windows = [p[:, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(x.float(), w) or torch.equal(x.float(), w.flip(-1)) for w in windows)


@pytest.mark.parametrize("workers,cache", [(0, False), (2, False), (0, True)])
def test_iterating_never_draws_from_the_global_generator(digits_root: Path, workers: int, cache: bool) -> None:
    """A DataLoader without its own generator draws its workers' seed from the global torch generator at every
    epoch start, which made a run resumed exactly at an epoch end one draw off."""
    loader = build_datamodule(_cfg(digits_root, workers=workers, cache=cache)).train_dataloader()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for _ in range(2):
        for _ in loader:
            pass
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("workers,cache", [(2, False), (0, True)])
def test_resume_mid_epoch_streamed_or_decoded_once(digits_root: Path, workers: int, cache: bool) -> None:
    full = build_datamodule(_cfg(digits_root, workers=workers, cache=cache)).train_dataloader()
    epoch0, epoch1 = _epochs(full, 2)
    for n in (5, 14):
        dm = build_datamodule(_cfg(digits_root, workers=workers, cache=cache))
        it = iter(dm.train_dataloader())
        taken = [next(it) for _ in range(n)]
        assert [b["key"] for b in taken] == [k for k, _ in epoch0[:n]]
        fresh = build_datamodule(_cfg(digits_root, workers=workers, cache=cache))
        fresh.load_state_dict(dm.state_dict())
        rest = _epochs(fresh.train_dataloader(), 1)[0]
        assert _same(rest, epoch0[n:] if n < 14 else epoch1)
