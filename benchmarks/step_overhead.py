"""Training-step overhead of scalegen against a plain PyTorch loop, measured in the same process.

Both train the same VAE network, on the same digits batches, with the same batch size and optimizer.
The plain loop iterates pre-decoded tensors in memory (its best case); scalegen runs its whole runtime
(shard pipeline, Lightning Trainer, LR schedule, metrics file, checkpoint callback; W&B and the progress
bar off). Steps/s are timed after a warm-up, over the same number of steps.

    python benchmarks/step_overhead.py [--steps 300] [--config small|wide|both]

Prints a table and, last, `ratio: X` (scalegen steps/s over plain, for the last config measured).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SCALEGEN_DATA", str(Path(tempfile.gettempdir()) / "scalegen-bench-data"))

from scalegen.config import load_config  # noqa: E402
from scalegen.data import build_datamodule  # noqa: E402
from scalegen.registry import get_family  # noqa: E402
from scalegen.runtime import train  # noqa: E402

CONFIGS = {
    "small": ["model.hidden=[256,128]", "data.batch_size=64"],  # the quickstart itself
    "wide": ["model.hidden=[2048,2048]", "model.latent_dim=64", "data.batch_size=256"],
}
WARMUP = 20


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == WARMUP:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > WARMUP:
            self.end, self.steps = time.perf_counter(), trainer.global_step - WARMUP


def scalegen_steps_per_s(overrides: list[str], steps: int, out: Path) -> float:
    cfg = load_config("quickstart", [*overrides, f"trainer.max_steps={steps + WARMUP}", "trainer.max_epochs=null",
                                     "trainer.progress_bar=false", "logging.wandb=false",
                                     "trainer.check_val_every_n_epoch=1000", "trainer.resume=never", f"run.dir={out}",
                                     f"run.name=bench-{len(list(out.iterdir()))}"])
    timer = StepTimer()
    train(cfg, callbacks=[timer])
    return timer.steps / (timer.end - timer.start)


def plain_steps_per_s(overrides: list[str], steps: int) -> float:
    cfg = load_config("quickstart", overrides)
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    batches = [b["x"] for b in dm.train_dataloader()]
    torch.manual_seed(0)
    model = get_family("vae").module(cfg.model, cfg.optim, dm.spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    i = 0
    start = 0.0
    for step in range(steps + WARMUP):
        if step == WARMUP:
            start = time.perf_counter()
        loss, _ = model.loss({"x": batches[i % len(batches)]})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        i += 1
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--config", choices=[*CONFIGS, "both"], default="both")
    args = parser.parse_args()
    names = list(CONFIGS) if args.config == "both" else [args.config]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            plain = plain_steps_per_s(CONFIGS[name], args.steps)
            ours = scalegen_steps_per_s(CONFIGS[name], args.steps, Path(tmp))
            rows.append((name, " ".join(CONFIGS[name]), plain, ours, ours / plain))
    print(f"\n{'config':<7} {'overrides':<58} {'plain steps/s':>14} {'scalegen steps/s':>17} {'ratio':>6}")
    for name, ov, plain, ours, ratio in rows:
        print(f"{name:<7} {ov:<58} {plain:>14.1f} {ours:>17.1f} {ratio:>6.3f}")
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"ratio: {rows[-1][4]:.3f}")


if __name__ == "__main__":
    main()
