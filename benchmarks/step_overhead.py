"""Training-step overhead of scalegen against a plain PyTorch loop, measured in the same process.

All loops train the same VAE network, on the same digits batches, with the same batch size, optimizer
and LR schedule (`scalegen.optim.build_optimizer`). Three loops per config:

- plain: a `for` loop over pre-decoded batches held in memory (its best case);
- lightning: a bare `L.Trainer` over the same in-memory batches, the module's `training_step` only
  returning the loss (no logger, callbacks, checkpointing or progress bar): the floor Lightning itself
  imposes, for reference;
- scalegen: the whole runtime, `scalegen.runtime.train(cfg)`: shard pipeline with the recipe's loader
  settings, Lightning Trainer, the recipe's logging, metrics file, checkpoint, checkpoint-contents,
  figures, per-rank-state and preemption callbacks (W&B and the progress bar off, validation not run
  inside the timed steps).

Steps/s are timed after 20 warm-up steps, over the same number of steps (300 for small, 60 for the
others). The configs:

- small: the quickstart itself (MLP 64-256-128-8, batch 64, training scalars every 50 steps);
- wide: an MLP of 2048x2048 hidden units, batch 256;
- conv: recipes/vae/mnist.yaml's convolutional VAE on MNIST (28x28, batch 64), when MNIST is available (prepared from
  `$SCALEGEN_SHARED/mnist` or the shared datasets folder beside the repository).

    python benchmarks/step_overhead.py [--steps N] [--repeats 3] [--threads 1] [--clock wall|cpu]
        [--config small|wide|conv|all] [--count-calls] [overrides]

Each config runs `--repeats` rounds of the three loops, interleaved, and keeps each loop's best round
(the machine is shared: the best round is the least disturbed). Prints a table and, last,
`ratio: X`: the *worst* scalegen / bare-Lightning ratio over the configs measured (what scalegen adds over
the Lightning it runs on; issue 19 sec. 3). `--count-calls` adds the Python calls per timed step of the
Lightning and scalegen loops, counted by cProfile in one more (untimed) run of each: on a VM whose speed
moves by more than the gap being measured, a count that does not move with it.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("SCALEGEN_DATA", str(Path(tempfile.gettempdir()) / "scalegen-bench-data"))

from scalegen.config import load_config  # noqa: E402
from scalegen.data import build_datamodule  # noqa: E402
from scalegen.optim import build_optimizer  # noqa: E402
from scalegen.registry import get_family  # noqa: E402
from scalegen.runtime.train import train  # noqa: E402

CONFIGS = {
    "small": ["model.hidden=[256,128]", "data.batch_size=64"],  # the quickstart itself
    "wide": ["model.hidden=[2048,2048]", "model.latent_dim=64", "data.batch_size=256"],
    # recipes/vae/mnist.yaml's network and per-device batch (Bernoulli conv VAE, 28x28)
    "conv": ["data.dataset=mnist", "model.net=conv", "model.hidden=[32,64,128]", "model.latent_dim=50",
             "model.likelihood=bernoulli", "data.batch_size=64"],
}
STEPS = {"small": 300, "wide": 60, "conv": 60}  # timed steps per loop (the big nets take ~0.2-0.3 s a step)
WARMUP = 20
CLOCK = [time.perf_counter]  # --clock cpu: time.process_time (CPU seconds of this process, all its threads)


def _mnist_source() -> str | None:
    shared = Path(os.environ.get("SCALEGEN_SHARED", REPO.parent / "shared" / "datasets"))
    return str(shared / "mnist") if (shared / "mnist").is_dir() else None


def _overrides(name: str) -> list[str] | None:
    if name != "conv":
        return CONFIGS[name]
    source = _mnist_source()
    return None if source is None else [*CONFIGS[name], f"data.source={source}"]


class StepTimer(L.Callback):
    """Times the steps after WARMUP; with `count_calls`, counts the Python calls they make instead (cProfile,
    untimed): a figure the machine's speed does not move, for what scalegen adds per step."""

    def __init__(self, count_calls: bool = False) -> None:
        self.start = self.end = 0.0
        self.steps = 0
        self.profile = cProfile.Profile() if count_calls else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == WARMUP:
            self.start = CLOCK[0]()
            if self.profile:
                self.profile.enable()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > WARMUP:
            self.end, self.steps = CLOCK[0](), trainer.global_step - WARMUP
        if self.profile and trainer.global_step == trainer.max_steps:
            self.profile.disable()

    def per_step(self) -> float:
        """Steps/s, or Python calls per step when counting."""
        if self.profile is None:
            return self.steps / (self.end - self.start)
        return sum(stat[1] for stat in pstats.Stats(self.profile).stats.values()) / self.steps


_BATCHES: dict[tuple[str, ...], list[dict]] = {}


def _setup(overrides: list[str], steps: int):
    """(config, model, in-memory batches) for the baselines; the model seeded like scalegen's."""
    cfg = load_config("quickstart", [*overrides, f"trainer.max_steps={steps + WARMUP}"])
    dm = build_datamodule(cfg.data)
    if tuple(overrides) not in _BATCHES:  # decoded once: the first steps' batches (or the whole epoch)
        dm.setup("fit")
        loader = itertools.islice(dm.train_dataloader(), steps + WARMUP)
        _BATCHES[tuple(overrides)] = [{"x": b["x"], "y": b["y"]} for b in loader]
    batches = _BATCHES[tuple(overrides)]
    torch.manual_seed(0)
    model = get_family(cfg.model.family).module(cfg.model, cfg.optim, dm.spec).train()
    return cfg, model, batches


def scalegen_loop(overrides: list[str], steps: int, out: Path, count_calls: bool = False) -> float:
    """Steps/s of `scalegen.runtime.train` (with `count_calls`: its Python calls per step instead)."""
    cfg = load_config("quickstart", [*overrides, f"trainer.max_steps={steps + WARMUP}", "trainer.max_epochs=null",
                                     "trainer.progress_bar=false", "logging.wandb=false",
                                     "trainer.check_val_every_n_epoch=1000", "trainer.resume=never", f"run.dir={out}",
                                     f"run.name=bench-{len(list(out.iterdir()))}"])
    timer = StepTimer(count_calls)
    train(cfg, callbacks=[timer])
    return timer.per_step()


def plain_loop(overrides: list[str], steps: int) -> float:
    """Steps/s of a plain PyTorch loop over the same in-memory batches."""
    cfg, model, batches = _setup(overrides, steps)
    opt = build_optimizer(model.parameters(), cfg.optim, steps + WARMUP)
    optimizer, schedule = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    start = 0.0
    for step in range(steps + WARMUP):
        if step == WARMUP:
            start = CLOCK[0]()
        loss, _ = model.loss(batches[step % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return steps / (CLOCK[0]() - start)


class _InMemory:
    """An iterable over in-memory batches (a bare list would be read by Lightning as a list of loaders)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class _Bare(L.LightningModule):
    """The same network and loss in a LightningModule that does nothing else."""

    def __init__(self, model: torch.nn.Module, total: int) -> None:
        super().__init__()
        self.model, self.total = model, total

    def training_step(self, batch, batch_idx):
        return self.model.loss(batch)[0]

    def configure_optimizers(self):
        return build_optimizer(self.model.parameters(), self.model.optim_cfg, self.total)


def lightning_loop(overrides: list[str], steps: int, out: Path, count_calls: bool = False) -> float:
    """Steps/s of a bare Lightning Trainer (with `count_calls`: its Python calls per step instead)."""
    cfg, model, batches = _setup(overrides, steps)
    timer = StepTimer(count_calls)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps + WARMUP, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer], default_root_dir=str(out))
    trainer.fit(_Bare(model, steps + WARMUP), train_dataloaders=_InMemory(batches))
    return timer.per_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps per loop (default {STEPS})")
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all three loops; the best of each is kept")
    # One intra-op thread for all loops: on a 2-core machine shared with anything else, two threads spin
    # against the other load and make every figure several times slower and noisier (12 vs 156 steps/s
    # for the plain loop once measured side by side).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every loop")
    # On a shared VM a whole loop (15-30 s for the big nets) can run 10-15% slower than the next one; CPU
    # time does not count the time the machine takes away. It counts every thread of the process, so it is
    # a fair clock only for the inline loader (the default; not data.num_workers>0).
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall time or CPU time")
    parser.add_argument("--count-calls", action="store_true",
                        help="also count Python calls per step of the Lightning and scalegen loops (untimed runs)")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every config (e.g. data.seed=1)")
    args = parser.parse_args()
    names = list(CONFIGS) if args.config == "all" else [args.config]
    torch.set_num_threads(args.threads)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    rows, calls = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            overrides = _overrides(name)
            if overrides is None:
                print(f"skipping {name}: no MNIST copy (set SCALEGEN_SHARED)", file=sys.stderr)
                continue
            overrides = [*overrides, *args.overrides]
            # Rounds interleave the three loops, so a burst of load from other processes hits each alike;
            # the best round of each is the least disturbed measurement of it.
            plain = bare = ours = 0.0
            steps = args.steps or STEPS[name]
            for _ in range(args.repeats):
                plain = max(plain, plain_loop(overrides, steps))
                bare = max(bare, lightning_loop(overrides, steps, Path(tmp)))
                ours = max(ours, scalegen_loop(overrides, steps, Path(tmp)))
            if args.count_calls:
                calls[name] = (lightning_loop(overrides, steps, Path(tmp), count_calls=True),
                               scalegen_loop(overrides, steps, Path(tmp), count_calls=True))
            rows.append((name, plain, bare, ours))
    print(f"\n{'config':<7} {'plain steps/s':>14} {'lightning steps/s':>18} {'scalegen steps/s':>17} "
          f"{'lightning/plain':>16} {'scalegen/plain':>15} {'scalegen/lightning':>19} "
          f"{'scalegen - lightning ms/step':>29}")
    for name, plain, bare, ours in rows:
        print(f"{name:<7} {plain:>14.1f} {bare:>18.1f} {ours:>17.1f} {bare / plain:>16.3f} {ours / plain:>15.3f} "
              f"{ours / bare:>19.3f} {1000 / ours - 1000 / bare:>29.2f}")
    if calls:
        print(f"\n{'config':<7} {'lightning calls/step':>21} {'scalegen calls/step':>20} {'scalegen - lightning':>21}")
        for name, (bare_calls, our_calls) in calls.items():
            print(f"{name:<7} {bare_calls:>21.0f} {our_calls:>20.0f} {our_calls - bare_calls:>21.0f}")
    for name, *_ in rows:
        print(f"{name}: {' '.join(CONFIGS[name] + args.overrides)}")
    print(f"threads: {torch.get_num_threads()}, clock: {args.clock}, torch {torch.__version__}")
    print(f"ratio: {min(ours / bare for _, _, bare, ours in rows):.3f}")


if __name__ == "__main__":
    main()
