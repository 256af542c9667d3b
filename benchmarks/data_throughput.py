"""Samples/s of the shard pipeline against iterating the same arrays from memory, in the same run.

For each dataset (digits, MNIST, CIFAR-10) and worker count (0, 1, 2) it times the shard loader
(`ShardDataModule.train_dataloader()`: read tar shards, shuffle buffer, decode PNG, collate) and a
plain map-style PyTorch `DataLoader` over the already-decoded uint8 tensors (shuffled, same batch size
and workers, persistent workers like the shard loader's), in alternating slices of `--slice` samples
until each has taken `--samples` (new passes started as needed). The VM this was written on runs at
two speeds that alternate every few seconds, and the slow one slows Python-bound code more than
copying memory; slices of a few tens of milliseconds put both loaders under the same conditions,
where rounds of whole passes compared one loader's quiet seconds with the other's slow ones. It prints
a table and, last, `ratio: X`: the worst time-per-sample of shards over memory in the table (target: < 2).
It also times whole epochs without workers (`_epochs`): a fresh loader's first pass (which decodes the split
into memory when it fits `data.cache_bytes`) and its later passes, each against an in-memory pass; with
`--rounds N`, N fresh loaders in turn, and the table gives the median (and the range) of their ratios.
`--clock cpu` times with this process's CPU time instead of the wall clock (steadier on a shared machine;
only with `--workers 0`, since workers' time is not this process's).

    PYTHONPATH=. python benchmarks/data_throughput.py [--samples 40000] [--slice 2560] [--batch-size 128]
        [--rounds 1] [--clock wall]

MNIST is prepared from `--mnist-source` (default: ../shared/datasets/mnist or $SCALEGEN_SHARED/mnist).
CIFAR-10 is prepared from `--cifar10-source` (a cifar-10-python.tar.gz or its folder) when given;
otherwise from a synthetic archive in the upstream format (10,000 smooth random 32x32 RGB images).
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from scalegen.config.schema import DataConfig
from scalegen.data import build_datamodule, prepare_dataset

REPO = Path(__file__).resolve().parents[1]
clock = time.perf_counter  # or time.process_time (--clock cpu)


class InMemory(Dataset):
    """The baseline: decoded uint8 arrays in memory, one dict per sample, default collate."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class _Clock:
    """One loader's running totals: samples taken and seconds spent taking them."""

    def __init__(self, loader: Iterable[dict]) -> None:
        self.loader, self.batches, self.samples, self.seconds = loader, None, 0, 0.0

    def take(self, n: int) -> None:
        """Take at least `n` samples, starting a new pass (a new iterator) whenever one ends."""
        got, start = 0, clock()
        while got < n:
            if self.batches is None:
                self.batches = iter(self.loader)
            batch = next(self.batches, None)
            if batch is None:
                self.batches = None
                continue
            got += len(batch["x"])
        self.seconds += clock() - start
        self.samples += got

    def per_second(self) -> float:
        return self.samples / self.seconds


def _interleaved(shards: Iterable[dict], memory: Iterable[dict], samples: int, slice_size: int) -> tuple[float, float]:
    """Samples/s of each loader, timed in alternating slices (which goes first alternates too), after one
    untimed slice each (worker start-up, first pass). With workers, the paused loader's workers refill
    their prefetch queues during the other's slice and it starts its next slice with those batches ready:
    the same for both loaders (same workers and queue depth), a head start of 4 of a slice's 20 batches
    with 2 workers."""
    clocks = _Clock(shards), _Clock(memory)
    for clock in clocks:
        clock.take(slice_size)
        clock.samples, clock.seconds = 0, 0.0
    order = list(clocks)
    while min(c.samples for c in clocks) < samples:
        for clock in order:
            clock.take(slice_size)
        order.reverse()
    return clocks[0].per_second(), clocks[1].per_second()


def _pass_seconds(loader: Iterable[dict]) -> float:
    start = clock()
    for _ in loader:
        pass
    return clock() - start


def _epochs(root: Path, x: torch.Tensor, y: torch.Tensor, batch_size: int, rounds: int = 1,
            epochs: int = 3) -> tuple[list[float], list[float]]:
    """Whole epochs without workers, as training sees them: a fresh shard loader's first pass (which decodes
    the split into memory when it fits data.cache_bytes) and its later passes, each against a pass of the
    in-memory baseline run right before it; `rounds` fresh loaders in turn. Returns per round (first / memory
    time, memory / later time: >= 0.9 is the target)."""
    cfg = DataConfig(root=str(root), batch_size=batch_size, shuffle_buffer=1000, prepare=False)
    baseline = DataLoader(InMemory(x, y), batch_size=batch_size, shuffle=True)
    _pass_seconds(baseline)  # warm-up
    firsts, laters = [], []
    for _ in range(rounds):
        loader = build_datamodule(cfg).train_dataloader()
        memory, shards = [], []
        for _ in range(epochs):
            memory.append(_pass_seconds(baseline))
            shards.append(_pass_seconds(loader))
        firsts.append(shards[0] / memory[0])
        laters.append(sum(memory[1:]) / sum(shards[1:]))
    return firsts, laters


def _summary(values: list[float]) -> str:
    """The median, and the range when there is more than one value."""
    median = f"{statistics.median(values):.2f}"
    return median if len(values) == 1 else f"{median} ({min(values):.2f}-{max(values):.2f})"


def _arrays(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    dm = build_datamodule(DataConfig(root=str(root), batch_size=1000, shuffle_buffer=0, prepare=False))
    xs, ys = zip(*[(b["x"], b["y"]) for b in dm.train_dataloader()])
    return torch.cat(xs), torch.cat(ys)


def _synthetic_cifar(folder: Path, n: int = 10000) -> Path:
    """The upstream python-pickle layout; images are smooth (upsampled 8x8 noise) like natural ones."""
    d = folder / "cifar-10-batches-py"
    if (d / "batches.meta").is_file():
        return folder
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = n // 5
    for name, count in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", per)]:
        low = rng.integers(0, 256, (count, 3, 8, 8), dtype=np.uint8)
        img = low.repeat(4, axis=2).repeat(4, axis=3) + rng.integers(0, 8, (count, 3, 32, 32), dtype=np.uint8)
        batch = {b"data": img.reshape(count, 3072), b"labels": rng.integers(0, 10, count).tolist()}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="digits,mnist,cifar10")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=40000, help="samples timed per loader")
    parser.add_argument("--slice", type=int, default=2560, help="samples a loader takes before the other's turn")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "scalegen-bench")
    candidates = [REPO.parent / "shared" / "datasets", REPO.parents[1] / "shared" / "datasets"]
    shared = Path(
        os.environ.get("SCALEGEN_SHARED", next((c for c in candidates if c.is_dir()), candidates[0]))
    )
    parser.add_argument("--mnist-source", default=str(shared / "mnist"))
    parser.add_argument("--cifar10-source", default=None)
    parser.add_argument("--rounds", type=int, default=1, help="fresh loaders whose whole epochs are timed")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time (with --workers 0 only)")
    args = parser.parse_args()
    if args.clock == "cpu":
        if any(int(w) for w in args.workers.split(",")):
            parser.error("--clock cpu times this process only: use it with --workers 0")
        global clock
        clock = time.process_time

    rows, epoch_rows = [], []
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, batch {args.batch_size}, "
        f"{args.samples} samples per loader in slices of {args.slice}, {args.clock} clock",
        flush=True,
    )
    for name in args.datasets.split(","):
        root = args.root / name
        source = {"mnist": args.mnist_source, "digits": None}.get(name)
        if name == "cifar10":
            source = args.cifar10_source or str(_synthetic_cifar(args.root / "cifar10-synthetic-src"))
            if args.cifar10_source is None:
                name = "cifar10 (synthetic)"
        prepare_dataset(root.name, root, source=source, progress=False)
        x, y = _arrays(root)
        first, later = _epochs(root, x, y, args.batch_size, args.rounds)
        epoch_rows.append((name, _summary(first), _summary(later)))
        print(f"  {name:<20} epochs without workers: first {_summary(first)}x memory time, "
              f"later {_summary(later)}x memory speed", flush=True)
        for workers in map(int, args.workers.split(",")):
            cfg = DataConfig(
                root=str(root),
                batch_size=args.batch_size,
                num_workers=workers,
                shuffle_buffer=1000,
                prepare=False,
            )
            loader = build_datamodule(cfg).train_dataloader()
            memory = InMemory(x, y)
            # Persistent workers for the baseline too, as the shard loader's are (started once, reused).
            baseline = DataLoader(
                memory, batch_size=args.batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
            )
            shards_sps, memory_sps = _interleaved(loader, baseline, args.samples, args.slice)
            rows.append((name, workers, shards_sps, memory_sps, memory_sps / shards_sps))
            print(
                f"  {name:<20} workers={workers}  shards {shards_sps:>9.0f}/s  memory {memory_sps:>9.0f}/s",
                flush=True,
            )

    print()
    print("| dataset | workers | shards (samples/s) | in-memory (samples/s) | time ratio shards/memory |")
    print("|---|---:|---:|---:|---:|")
    for name, workers, s, m, r in rows:
        print(f"| {name} | {workers} | {s:,.0f} | {m:,.0f} | {r:.2f} |")
    print()
    rounds = "" if args.rounds == 1 else f", median (range) of {args.rounds} fresh loaders"
    print(f"| dataset | first epoch: time / in-memory time (target <= 2){rounds} "
          f"| later epochs: speed / in-memory speed (target >= 0.9){rounds} |")
    print("|---|---:|---:|")
    for name, first, later in epoch_rows:
        print(f"| {name} | {first} | {later} |")
    print()
    print(f"ratio: {max(r for *_, r in rows):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
