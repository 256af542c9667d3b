"""Exact splitting and gathering across ranks: a real 2-process gloo group against one process."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from scalegen.eval.dist import shard_bounds

HERE = Path(__file__).resolve().parent


def test_shard_bounds_cover_every_example_once():
    for n in (0, 1, 5, 37, 100):
        for world in (1, 2, 3, 8):
            blocks = [shard_bounds(n, r, world) for r in range(world)]
            covered = [i for a, b in blocks for i in range(a, b)]
            assert covered == list(range(n))
            sizes = [b - a for a, b in blocks]
            assert max(sizes) - min(sizes) <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path.insert(0, str(HERE))
    import torch.distributed as dist

    from scalegen.eval.dist import gather_rows, rank_world
    from scalegen.eval.runner import per_example

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        from toy_models import blobs, fit_to, make_model

        model = make_model()
        x, y = blobs(37, seed=3)  # 37 = 19 + 18: an uneven last block, and batches of 5 leave remainders
        fit_to(model, x[:20])
        nll = per_example(lambda a, b: model.nll(a, b), x, y, batch_size=5, device=torch.device("cpu"))
        feats = per_example(lambda a, b: model.encode(a), x, y, batch_size=4, device=torch.device("cpu"))
        sums = per_example(lambda a, b: a.long().flatten(1).sum(1), x, y, batch_size=5, device=torch.device("cpu"))
        ranks = gather_rows(torch.full((rank + 2, 3), float(rank)))  # blocks of different sizes
        assert rank_world() == (rank, world)
        torch.save({"nll": nll, "feats": feats, "sums": sums, "ranks": ranks}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gather_equals_one_process(tmp_path):
    sys.path.insert(0, str(HERE))
    from toy_models import blobs, fit_to, make_model

    from scalegen.eval.runner import per_example

    model = make_model()
    x, y = blobs(37, seed=3)
    fit_to(model, x[:20])
    want_nll = per_example(lambda a, b: model.nll(a, b), x, y, batch_size=5, device=torch.device("cpu"))
    want_feats = per_example(lambda a, b: model.encode(a), x, y, batch_size=4, device=torch.device("cpu"))
    assert want_nll.shape == (37,)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # Integer per-example values: bitwise equal, so same order, nothing dropped or repeated.
        assert torch.equal(got["sums"], x.long().flatten(1).sum(1))
        # Float ones: equal up to summation order inside a batch.
        torch.testing.assert_close(got["nll"], want_nll, rtol=1e-6, atol=1e-4)
        assert torch.allclose(got["feats"], want_feats, atol=1e-6)
        assert got["ranks"].tolist() == [[0.0] * 3] * 2 + [[1.0] * 3] * 3


@pytest.fixture(autouse=True)
def _no_leftover_group():
    yield
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
