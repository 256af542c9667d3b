"""Training steps/s with `trainer.compile` (torch.compile of the family's networks) against eager, on CPU.

Two configs, each a family's own training step (loss, backward, the recipe's optimizer) on one fixed
batch in a plain loop, so that only the networks' speed differs:

- conv_vae: recipes/vae/tiny.yaml's convolutional VAE on the 8x8 digits (batch 64);
- tiny_unet: recipes/ddpm/tiny.yaml's UNet on the 8x8 digits (batch 64).

Eager and compiled (scalegen's `compile_networks`, inductor, `--mode`) models start from the same
seed. Compilation happens in the first steps (its time is printed); steps/s are timed after
`--warmup` steps over `--steps` steps, in `--repeats` interleaved rounds keeping each one's best.
`--clock cpu` divides by this process's CPU seconds instead of wall seconds (fair on a shared machine
with one thread). The last line is `ratio: X`, the worst compiled/eager ratio.

    PYTHONPATH=$PWD python benchmarks/compile_speed.py [--steps 30] [--repeats 2] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scalegen.runtime.optim import make_optimizer  # noqa: E402

from scalegen.callbacks.compile import compile_networks  # noqa: E402
from scalegen.config import load_config  # noqa: E402
from scalegen.dataspec import DataSpec  # noqa: E402
from scalegen.registry import get_family  # noqa: E402

CONFIGS = {
    "conv_vae": ("vae/tiny", [], (1, 8, 8), 64),
    "tiny_unet": ("ddpm/tiny", [], (1, 8, 8), 64),
    # recipes/vae/mnist.yaml's conv VAE at 28x28: inductor's first compile of it takes many minutes of CPU
    "conv_vae_mnist": ("vae/mnist", [], (1, 28, 28), 64),
}
DEFAULT = ("conv_vae", "tiny_unet")


def build(name: str, compiled: bool, mode: str):
    recipe, overrides, shape, batch_size = CONFIGS[name]
    cfg = load_config(recipe, overrides)
    torch.manual_seed(0)
    model = get_family(cfg.model.family).module(cfg.model, cfg.optim, DataSpec(shape=shape)).train()
    if compiled:
        compile_networks(model, mode)
    opt = make_optimizer(model.parameters(), model.optim_cfg)
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randint(0, 256, (batch_size, *shape), dtype=torch.uint8, generator=g),
             "y": torch.randint(0, 10, (batch_size,), generator=g)}

    def step() -> None:
        loss, _ = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="all", choices=["all", *CONFIGS])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = p.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, clock {args.clock}, mode {args.mode}")
    ratios = []
    for name in DEFAULT if args.config == "all" else [args.config]:
        steps = {}
        for compiled in (False, True):
            steps[compiled] = build(name, compiled, args.mode)
            start = clock()
            for _ in range(args.warmup):
                steps[compiled]()
            label = "compiled" if compiled else "eager"
            print(f"{name} {label}: first {args.warmup} steps (compilation included) {clock() - start:.1f} s",
                  flush=True)
        best = {False: 0.0, True: 0.0}
        for _ in range(args.repeats):
            for compiled in (False, True):
                start = clock()
                for _ in range(args.steps):
                    steps[compiled]()
                best[compiled] = max(best[compiled], args.steps / (clock() - start))
        ratio = best[True] / best[False]
        ratios.append(ratio)
        print(f"{name}: eager {best[False]:.2f} steps/s, compiled {best[True]:.2f} steps/s, x{ratio:.2f}", flush=True)
    print(f"ratio: {min(ratios):.3f}")


if __name__ == "__main__":
    main()
