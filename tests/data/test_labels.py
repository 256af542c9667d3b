"""Partly labelled data: exactly N labels per class over the whole training split, the same on every rank,
epoch and resume, and a labelled stream beside the main one (two real gloo processes)."""

from __future__ import annotations

import json
import random
import socket
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalegen.config.schema import DataConfig
from scalegen.data import DataError, build_datamodule
from scalegen.data.labels import choose_labelled
from scalegen.data.shards import iter_shard

PER_CLASS = 5


def _true_labels(root: Path) -> dict[str, int]:
    """Every training key's label, read straight from the shards' `cls` members."""
    return {s["__key__"]: int(s["cls"]) for p in sorted(root.glob("train-*.tar")) for s in iter_shard(str(p))}


def test_choice_is_exact_per_class_and_independent_of_order() -> None:
    pairs = [(f"k{i}", i % 3) for i in range(30)] + [("unlabelled", -1)]
    chosen = choose_labelled(pairs, 4, seed=7, num_classes=3)
    assert Counter(chosen.values()) == {0: 4, 1: 4, 2: 4}
    assert all(int(k[1:]) % 3 == c for k, c in chosen.items())
    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    assert choose_labelled(shuffled, 4, seed=7, num_classes=3) == chosen  # shard order / rank do not matter
    assert set(choose_labelled(pairs, 4, seed=8, num_classes=3)) != set(chosen)  # the seed does
    uneven = [p for p in pairs if p[0] not in ("k1", "k4")]  # class 1 keeps 8 examples
    assert Counter(choose_labelled(uneven, 8, seed=0, num_classes=3).values()) == {0: 8, 1: 8, 2: 8}
    with pytest.raises(DataError, match=r"class 1 has only 8 .* at most 8"):
        choose_labelled(uneven, 9, seed=0, num_classes=3)


def test_labelled_stream_needs_labels_per_class(digits_root: Path) -> None:
    with pytest.raises(DataError, match="set data.labels_per_class"):
        build_datamodule(DataConfig(root=str(digits_root), prepare=False), labelled_stream=True)


def _batches(loader, n: int | None = None) -> list[dict]:
    out = []
    for b in loader:
        out.append({k: b[k].tolist() if isinstance(b[k], torch.Tensor) else b[k]
                    for k in ("key", "y", "key_labelled", "y_labelled", "x", "x_labelled")})
        if n is not None and len(out) == n:
            break
    return out


def _rank_main(rank: int, world: int, port: int, root: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        cfg = DataConfig(root=root, batch_size=64, shuffle_buffer=50, seed=1, labels_per_class=PER_CLASS,
                         label_seed=3, prepare=False)
        dm = build_datamodule(cfg, labelled_stream=True)
        loader = dm.train_dataloader()
        epochs = [_batches(loader), _batches(loader)]
        assert loader.epoch == 1
        # Resume: 4 batches into epoch 0, then a new datamodule from the saved state.
        first = build_datamodule(cfg, labelled_stream=True)
        _batches(first.train_dataloader(), 4)
        resumed = build_datamodule(cfg, labelled_stream=True)
        resumed.load_state_dict(first.state_dict())
        rest = _batches(resumed.train_dataloader())
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"epochs": epochs, "rest": rest})
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_see_exactly_n_labels_per_class_every_epoch_and_after_resume(digits_root: Path,
                                                                                tmp_path: Path) -> None:
    out = tmp_path / "ranks.json"
    mp.spawn(_rank_main, args=(2, _free_port(), str(digits_root), str(out)), nprocs=2, join=True)
    ranks = json.loads(out.read_text())
    truth = _true_labels(digits_root)
    labelled_sets = []
    for epoch in range(2):
        seen = {}  # key -> y over both ranks' main streams
        for r in ranks:
            for b in r["epochs"][epoch]:
                seen.update(zip(b["key"], b["y"]))
        assert set(seen) == set(truth)  # the whole split, as before
        kept = {k: y for k, y in seen.items() if y >= 0}
        assert all(truth[k] == y for k, y in kept.items())  # a kept label is the true one
        assert Counter(kept.values()) == dict.fromkeys(range(10), PER_CLASS)  # exactly N per class
        labelled_sets.append(set(kept))
    assert labelled_sets[0] == labelled_sets[1]  # the same examples every epoch

    xs = {}  # main-stream pixels of every key (no random transforms configured)
    for r in ranks:
        for b in r["epochs"][0]:
            xs.update(zip(b["key"], map(str, b["x"])))
    for r in ranks:
        draws = [k for e in r["epochs"] for b in e for k in b["key_labelled"]]
        for e in r["epochs"]:
            for b in e:
                assert len(b["key_labelled"]) == len(set(b["key_labelled"])) == 10 * PER_CLASS
                assert all(truth[k] == y for k, y in zip(b["key_labelled"], b["y_labelled"]))
                assert all(xs[k] == str(x) for k, x in zip(b["key_labelled"], b["x_labelled"]))
        assert set(draws) == labelled_sets[0]  # the labelled stream draws from exactly that subset
        consecutive = [e[i]["key_labelled"] for e in r["epochs"] for i in range(len(e))]
        assert consecutive[0] != consecutive[1]  # reshuffled each pass
    assert ranks[0]["epochs"][0][0]["key_labelled"] != ranks[1]["epochs"][0][0]["key_labelled"]

    for r in ranks:  # the resumed rest of epoch 0 equals the uninterrupted one, labelled stream included
        assert r["rest"] == r["epochs"][0][4:]
