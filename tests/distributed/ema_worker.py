"""One rank of the EMA-under-DDP check (Lightning Trainer, strategy=ddp, gloo), launched 2x by torchrun.

Trains the VAE with the EMA callback, records the whole weights after every optimizer step, and
checks what only a rank can see: during validation the module holds the average, after
it the trained weights again. Writes OUT/rank{r}.pt with the trajectory, the callback's average and
the checkpoint paths; a second phase resumes from the mid-run checkpoint.
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
from dist_helpers import DIGITS_SPEC, digit_batches, trainer_config  # noqa: E402

from scalegen.callbacks.ema import EMA  # noqa: E402


class Recorder(L.Callback):
    """Weights after each optimizer step, and what the module held during validation."""

    def __init__(self) -> None:
        self.trajectory: list[dict[str, torch.Tensor]] = []
        self.in_validation: list[dict[str, torch.Tensor]] = []
        self.after_validation: list[dict[str, torch.Tensor]] = []
        self._last = -1
        self.initial: dict[str, torch.Tensor] = {}
        self.ema_at_start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.initial = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))  # runs before this callback
        self.ema_at_start = ema.ema.weights()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            self.trajectory.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and not trainer.sanity_checking:
            self.in_validation.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.after_validation.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def loader(rank: int, world: int, n: int):
    # Its own generator: creating an iterator then draws no seed from the global one (RankState restores it).
    return torch.utils.data.DataLoader(
        digit_batches(rank, world, 8, n),
        batch_size=None,
        shuffle=False,
        generator=torch.Generator().manual_seed(0),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--resume-from", default=None)
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    from scalegen.registry import get_family

    cfg = trainer_config()
    L.seed_everything(0, verbose=False)
    model = get_family("vae").module(cfg.model, cfg.optim, DIGITS_SPEC)
    ema, rec = EMA(decay=0.8, warmup_steps=0, every_n_steps=2), Recorder()
    out = Path(args.out)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp",
        max_steps=args.steps,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[ema, rec],
        enable_checkpointing=False,
    )
    trainer.fit(
        model,
        train_dataloaders=loader(rank, world, 4),
        val_dataloaders=loader(rank, world, 1),
        ckpt_path=args.resume_from,
    )
    trainer.save_checkpoint(out / "final.ckpt")
    torch.save(
        {
            "trajectory": rec.trajectory,
            "initial": rec.initial,
            "ema_at_start": rec.ema_at_start,
            "ema": ema.ema.weights(),
            "in_val": rec.in_validation,
            "after_val": rec.after_validation,
            "num_updates": ema.ema.num_updates,
            "final": {k: v.detach().clone() for k, v in model.state_dict().items()},
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
