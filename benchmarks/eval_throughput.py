"""Evaluation throughput on this machine.

1. Inception features per second on CPU (or --device) for every combination of --batch-sizes,
   --threads, memory layout (contiguous NCHW, channels-last NHWC) and precision (fp32, bf16 autocast),
   each with the relative difference ||f - f_ref|| / ||f_ref|| of its features from the reference
   setting's (fp32, contiguous, one thread) on the same images; the fastest setting whose features
   are the same (<= 1e-4) is the one to use. The FID InceptionV3 runs with seeded random weights: the
   arithmetic, and so the speed, is that of the real weights. Settings are timed in interleaved rounds
   (--rounds), keeping each one's best (the machine may be shared).
1b. --fid-pair N: FID between the first N MNIST test and the first N training images with fp32 and
   with bf16 features, from the random-weight network with its BatchNorm statistics calibrated on 32
   other MNIST images (`calibrate`), so that features vary between images; the values themselves mean
   nothing, their difference is what bf16 does to an FID.
2. Wall time of a full FID of the 10,000 MNIST test images against the 60,000 training images,
   end to end (features of both sets, statistics, Frechet distance), with the domain extractor
   (a classifier trained on MNIST; its training time is reported separately), and the same FID
   with Inception projected from the measured features/s at batch 128 (unless --inception-fid,
   which runs it).

    PYTHONPATH=$PWD python benchmarks/eval_throughput.py [--mnist PATH] [--batch-sizes 4,16,32]
        [--threads 1,2] [--rounds 2] [--fid-pair 100] [--skip-fid] [--skip-sweep]
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
def calibrate(net, images: torch.Tensor) -> None:
    """Set every BatchNorm's statistics to those of its input on `images`, layer by layer, in one pass.

    Randomly initialized, the network's activations shrink layer after layer until every image has
    nearly the same features (an FID of ~1e-14); calibrated, each layer's output is normalized as in a
    trained network, so features differ between images and an FID difference means something.
    """
    from scalegen.metrics.inception import BatchNorm

    def set_stats(module, inputs):
        x = inputs[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    hooks = [m.register_forward_pre_hook(set_stats) for m in net.modules() if isinstance(m, BatchNorm)]
    try:
        net(images)
    finally:
        for h in hooks:
            h.remove()


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


SETTINGS = [(layout, precision) for precision in ("fp32", "bf16") for layout in ("contiguous", "channels_last")]


@torch.no_grad()
def sweep(net, batches: list[int], threads: list[int], rounds: int, min_seconds: float, device) -> list[dict]:
    """features/s and feature difference from the reference for every (batch, threads, layout, precision)."""
    images = torch.randint(0, 256, (max(batches), 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    torch.set_num_threads(1)
    net.set_speed(False, "fp32")
    reference = {b: net(images[:b])[0] for b in batches}
    rows = {}
    for r in range(rounds):
        for b in batches:
            for t in threads:
                torch.set_num_threads(t)
                for layout, precision in SETTINGS:
                    net.set_speed(layout == "channels_last", precision)
                    rate = features_per_second_on(net, images[:b], min_seconds)
                    key = (b, t, layout, precision)
                    if key not in rows:
                        f = net(images[:b])[0]
                        diff = float((f - reference[b]).norm() / reference[b].norm())
                        rows[key] = {"batch": b, "threads": t, "layout": layout, "precision": precision,
                                     "images_per_s": rate, "rel_diff": diff}
                    rows[key]["images_per_s"] = max(rows[key]["images_per_s"], rate)
        print(f"  round {r + 1}/{rounds} done", flush=True)
    net.set_speed(False, "fp32")
    return list(rows.values())


CLOCK = [time.perf_counter]  # --clock cpu: time.process_time (this process's CPU seconds, all threads)


def features_per_second_on(net, images: torch.Tensor, min_seconds: float) -> float:
    net(images)  # warm-up (oneDNN picks its kernels per shape and layout)
    n, start = 0, CLOCK[0]()
    while True:
        net(images)
        n += len(images)
        elapsed = CLOCK[0]() - start
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
    p.add_argument("--batch-sizes", default="4,16,32")
    p.add_argument("--threads", default="1,2", help="intra-op thread counts to time")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (best kept)")
    p.add_argument("--min-seconds", type=float, default=3.0, help="time each setting for at least this long")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: per CPU second of this process (fair under load, 1 thread only)")
    p.add_argument("--fid-pair", type=int, default=0, help="FID of N MNIST test vs N train images, fp32 and bf16")
    p.add_argument("--skip-fid", action="store_true", help="skip the end-to-end FID timings")
    p.add_argument("--skip-sweep", action="store_true", help="skip the features/s sweep")
    p.add_argument("--inception-fid", action="store_true", help="run the Inception FID instead of projecting it")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    print(f"clock: {args.clock}; torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")

    net = random_inception(device)
    batches = [int(s) for s in args.batch_sizes.split(",")]
    threads = [int(s) for s in args.threads.split(",")]
    print("\nInception features/s (299x299, random weights); rel. diff = ||f - f_ref|| / ||f_ref||, ref = fp32, "
          "contiguous, 1 thread")
    rows = [] if args.skip_sweep else sweep(net, batches, threads, args.rounds, args.min_seconds, device)
    print("| batch | threads | layout | precision | images/s | rel. diff |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batch']} | {r['threads']} | {r['layout']} | {r['precision']} | {r['images_per_s']:.2f} | "
              f"{r['rel_diff']:.1e} |")
    same = [r for r in rows if r["rel_diff"] <= 1e-4]
    if not same:  # --skip-sweep: the CPU default
        same = [{"batch": batches[0], "threads": max(threads), "layout": "channels_last", "images_per_s": 0.0}]
    best = max(same, key=lambda r: r["images_per_s"])
    print(f"fastest with the same features: batch {best['batch']}, {best['threads']} threads, {best['layout']} "
          f"({best['images_per_s']:.2f} images/s)")
    rates = {b: max(r["images_per_s"] for r in same if r["batch"] == b and r["threads"] == max(threads))
             for b in batches}
    torch.set_num_threads(max(threads))

    root = Path(args.mnist)
    if args.fid_pair:
        from scalegen.metrics.fid import fid_from_features

        xtr, _ = read_mnist(root, "train")
        xte, _ = read_mnist(root, "t10k")
        n, out = args.fid_pair, {}
        net.set_speed(False, "fp32")
        calibrate(net, torch.cat([xte[n : n + 16], xtr[n : n + 16]]))  # other images than the pair's
        for precision in ("fp32", "bf16"):
            net.set_speed(best["layout"] == "channels_last", precision)
            out[precision] = fid_from_features(extract(net, xte[:n], best["batch"], device),
                                               extract(net, xtr[:n], best["batch"], device))
        net.set_speed(False, "fp32")
        print(f"\nFID, first {n} MNIST test vs first {n} train images (calibrated random-weight Inception): fp32 "
              f"{out['fp32']:.6g}, bf16 {out['bf16']:.6g}, difference {out['bf16'] - out['fp32']:+.3g} "
              f"({(out['bf16'] - out['fp32']) / out['fp32']:+.2%})")
    if args.skip_fid:
        return
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
