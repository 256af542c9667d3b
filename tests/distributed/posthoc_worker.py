"""One rank of the post-hoc EMA checks (Lightning Trainer; strategy=ddp with gloo when launched 2x by
torchrun, one process otherwise).

Trains a deterministic autoencoder (the `ae` family: no sampling noise, so one process and two follow the
same trajectory up to summation order) on digit batches (global batch j holds the same digits whatever the
world size) with two
`PostHocEMA` callbacks: the configured profiles (sigma_rel 0.05 and 0.10, snapshots every `--every` steps)
into OUT/snapshots, and a third profile (sigma_rel 0.07) tracked directly into OUT/direct. Records the
whole weights after every optimizer step and writes OUT/rank{r}.pt with them and the callbacks' averages;
OUT/final.ckpt is the checkpoint a second phase resumes from (`--resume-from`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from dist_helpers import DIGITS_SPEC, digit_batches  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import scalegen.families  # noqa: E402, F401  (registers the built-in families)
from scalegen.callbacks.posthoc_ema import PostHocEMA  # noqa: E402
from scalegen.config.schema import Config, DataConfig  # noqa: E402
from scalegen.registry import get_family  # noqa: E402

DIRECT_SIGMA_REL = 0.07


class Trajectory(L.Callback):
    """The weights after each optimizer step, keyed by the step, and the post-hoc averages at the start."""

    def __init__(self, posthoc: PostHocEMA) -> None:
        self.posthoc = posthoc
        self.steps: dict[int, dict[str, torch.Tensor]] = {}
        self.at_start: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):  # after PostHocEMA's (it comes first in the list)
        self.at_start = [s.weights() for s in self.posthoc.states]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batches", type=int, default=24, help="micro-batches per epoch and rank")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--resume-from", default=None)
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    ae = get_family("ae")
    cfg = OmegaConf.structured(Config(model=ae.config(hidden=[32], code_dim=8), data=DataConfig(root="unused")))
    cfg.optim.lr = 1e-2
    L.seed_everything(0, verbose=False)
    model = ae.module(cfg.model, cfg.optim, DIGITS_SPEC)
    out = Path(args.out)
    posthoc = PostHocEMA(out / "snapshots", [0.05, 0.10], every_n_steps=args.every)
    direct = PostHocEMA(out / "direct", [DIRECT_SIGMA_REL], every_n_steps=10**9)  # one snapshot, at the end
    trajectory = Trajectory(posthoc)
    micro = args.global_batch // world
    batches = digit_batches(rank, world, micro, args.batches)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        max_steps=args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[posthoc, direct, trajectory],
        enable_checkpointing=False,
        use_distributed_sampler=False,  # each rank's loader already holds its share of every global batch
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False,
                                         generator=torch.Generator().manual_seed(0))
    trainer.fit(model, train_dataloaders=loader, ckpt_path=args.resume_from)
    trainer.save_checkpoint(out / "final.ckpt")
    torch.save(
        {
            "trajectory": trajectory.steps,
            "at_start": trajectory.at_start,
            "posthoc": [s.weights() for s in posthoc.states],
            "direct": direct.states[0].weights(),
            "num_updates": [s.num_updates for s in posthoc.states],
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
