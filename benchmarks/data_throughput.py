"""Samples/s of the shard pipeline against iterating the same arrays from memory, in the same run.

For each dataset (digits, MNIST, CIFAR-10) and worker count (0, 1, 2) it times one pass of
`ShardDataModule.train_dataloader()` (read tar shards, shuffle buffer, decode PNG, collate) and one
pass of a plain map-style PyTorch `DataLoader` over the already-decoded uint8 tensors (shuffled,
same batch size and workers, persistent workers like the shard loader's), over the same number of
samples. It prints a table and, last,
`ratio: X`: the worst time-per-sample of shards over memory in the table (target: < 2).

    PYTHONPATH=. python benchmarks/data_throughput.py [--samples 20000] [--repeats 3] [--batch-size 128]

MNIST is prepared from `--mnist-source` (default: ../shared/datasets/mnist or $SCALEGEN_SHARED/mnist).
CIFAR-10 is prepared from `--cifar10-source` (a cifar-10-python.tar.gz or its folder) when given;
otherwise from a synthetic archive in the upstream format (10,000 smooth random 32x32 RGB images).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from scalegen.config.schema import DataConfig
from scalegen.data import build_datamodule, prepare_dataset

REPO = Path(__file__).resolve().parents[1]


class InMemory(Dataset):
    """The baseline: decoded uint8 arrays in memory, one dict per sample, default collate."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def _time(loader_factory, samples: int) -> float:
    """Samples/s over `samples` samples, starting fresh passes (new iterators) as needed."""
    seen, start = 0, time.perf_counter()
    while seen < samples:
        for batch in loader_factory():
            seen += len(batch["x"])
            if seen >= samples:
                break
    return seen / (time.perf_counter() - start)


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
    parser.add_argument("--samples", type=int, default=20000, help="samples timed per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each loader; the best is kept")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "scalegen-bench")
    candidates = [REPO.parent / "shared" / "datasets", REPO.parents[1] / "shared" / "datasets"]
    shared = Path(
        os.environ.get("SCALEGEN_SHARED", next((c for c in candidates if c.is_dir()), candidates[0]))
    )
    parser.add_argument("--mnist-source", default=str(shared / "mnist"))
    parser.add_argument("--cifar10-source", default=None)
    args = parser.parse_args()

    rows = []
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, batch {args.batch_size}, "
        f"{args.samples} samples per measurement",
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
            # Alternating rounds, best of each: the machine is shared, and a first pass pays for warm-up.
            shards_sps = memory_sps = 0.0
            for _ in range(args.repeats):
                shards_sps = max(shards_sps, _time(lambda loader=loader: loader, args.samples))
                memory_sps = max(memory_sps, _time(lambda baseline=baseline: baseline, args.samples))
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
    print(f"ratio: {max(r for *_, r in rows):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
