"""Two real processes (gloo): each rank reads its share, steps in lockstep, and the union is the split."""

from __future__ import annotations

import json
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalegen.config.schema import DataConfig
from scalegen.data import build_datamodule


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, root: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        dm = build_datamodule(DataConfig(root=root, batch_size=64, num_workers=1, shuffle_buffer=50,
                                         prepare=False))
        keys, steps = [], 0
        for batch in dm.train_dataloader():
            # A collective per step, like DDP's gradient all-reduce: unequal step counts would hang here.
            total = torch.tensor([len(batch["key"])])
            dist.all_reduce(total)
            keys += batch["key"]
            steps += 1
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"keys": keys, "steps": steps})
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_read_disjoint_halves(digits_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    mp.spawn(_rank_main, args=(2, _free_port(), str(digits_root), str(out)), nprocs=2, join=True)
    ranks = json.loads(out.read_text())
    assert ranks[0]["steps"] == ranks[1]["steps"] == 11  # ceil(674 / 64)
    a, b = set(ranks[0]["keys"]), set(ranks[1]["keys"])
    assert len(a) == len(ranks[0]["keys"]) and len(b) == len(ranks[1]["keys"])  # no duplicates within a rank
    assert not a & b and len(a | b) == 1347  # disjoint, nothing lost
