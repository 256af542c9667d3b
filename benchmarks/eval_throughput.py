"""Evaluation throughput on this machine.

1. Inception features per second on CPU (or --device) at batch sizes 1..128. The FID InceptionV3 runs
   with seeded random weights: the arithmetic, and so the speed, is that of the real weights.
2. Wall time of a full FID of the 10,000 MNIST test images against the 60,000 training images,
   end to end (features of both sets, statistics, Frechet distance), with the domain extractor
   (a classifier trained on MNIST; its training time is reported separately), and the same FID
   with Inception projected from the measured features/s at batch 128 (unless --inception-fid,
   which runs it).

    PYTHONPATH=$PWD python benchmarks/eval_throughput.py [--mnist PATH] [--batch-sizes 1,2,...,128]
"""

from __future__ import annotations

import argparse
import gzip
import os
import time
from pathlib import Path

import numpy as np
import torch


def read_mnist(root: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.frombuffer(gzip.open(root / f"{prefix}-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    y = np.frombuffer(gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return torch.from_numpy(x.reshape(-1, 1, 28, 28).copy()), torch.from_numpy(y.astype(np.int64))


def random_inception(device: torch.device):
    from scalegen.metrics.inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3()
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return net.to(device).eval()


@torch.no_grad()
def features_per_second(net, batch: int, device: torch.device, min_seconds: float, channels: int = 3) -> float:
    images = torch.randint(0, 256, (batch, channels, 32, 32), dtype=torch.uint8, device=device)
    net(images)  # warm-up
    n, start = 0, time.perf_counter()
    while True:
        net(images)
        n += batch
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n / elapsed


@torch.no_grad()
def extract(net, x: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    return torch.cat([net(x[i : i + batch].to(device))[0].cpu() for i in range(0, len(x), batch)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = os.environ.get("SCALEGEN_SHARED") or Path(__file__).resolve().parents[2] / "shared" / "datasets"
    p.add_argument("--mnist", default=str(Path(shared) / "mnist"), help="folder with the MNIST IDX .gz files")
    p.add_argument("--domain-train-examples", type=int, default=None,
                   help="train the domain classifier on the first N training images (default: all)")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128")
    p.add_argument("--min-seconds", type=float, default=3.0, help="time each batch size for at least this long")
    p.add_argument("--device", default="cpu")
    p.add_argument("--inception-fid", action="store_true", help="run the Inception FID instead of projecting it")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")

    net = random_inception(device)
    rates = {}
    print("\nInception features/s (299x299, random weights)")
    for b in [int(s) for s in args.batch_sizes.split(",")]:
        rates[b] = features_per_second(net, b, device, args.min_seconds)
        print(f"  batch {b:4d}: {rates[b]:8.2f} images/s")

    root = Path(args.mnist)
    if not (root / "t10k-images-idx3-ubyte.gz").is_file():
        print(f"\nMNIST not found at {root}: skipping the FID timings (--mnist PATH)")
        return
    from scalegen.metrics.domain import DomainTraining, train_domain_classifier
    from scalegen.metrics.fid import fid_from_features

    xtr, ytr = read_mnist(root, "train")
    xte, _ = read_mnist(root, "t10k")
    t0 = time.perf_counter()
    recipe = DomainTraining(max_examples=args.domain_train_examples)
    n = args.domain_train_examples or len(xtr)
    dom = train_domain_classifier(xtr[:n], ytr[:n], 10, recipe).to(device)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fid = fid_from_features(extract(dom, xte, 1000, device), extract(dom, xtr, 1000, device))
    dom_s = time.perf_counter() - t0
    print(f"\ndomain classifier training on {n} images (once, then cached): {train_s:.1f} s")
    print(f"domain FID, 10,000 MNIST test vs 60,000 train: {dom_s:.1f} s (FID {fid:.3f})")
    best = max(rates, key=rates.get)  # the fastest batch size
    if args.inception_fid:
        t0 = time.perf_counter()
        fid = fid_from_features(extract(net, xte, best, device), extract(net, xtr, best, device))
        print(f"Inception FID (random weights), 10,000 test vs 60,000 train: {time.perf_counter() - t0:.1f} s")
    else:
        print(
            f"Inception FID, 10,000 test vs 60,000 train: ~{70000 / rates[best]:.0f} s projected "
            f"(70,000 images at {rates[best]:.2f} images/s, the fastest batch size, {best}; --inception-fid runs it)"
        )
    print(f"ratio: {(70000 / rates[best]) / dom_s:.1f}  (Inception FID time over domain FID time)")


if __name__ == "__main__":
    main()
