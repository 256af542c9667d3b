"""Worker for test_gan.py::test_ddp_two_processes_keep_identical_networks (run as a script, not collected).

Trains the GAN family on 2 CPU processes with Lightning's DDP strategy (gloo) and writes, per rank, the
flattened parameters, the initial parameters and the example indices that rank trained on.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from scalegen.config.schema import OptimConfig, TrainerConfig
from scalegen.dataspec import DataSpec
from scalegen.distributed import strategy
from scalegen.families.gan import GAN, GANConfig


class Indexed(Dataset):
    def __init__(self, n: int = 64) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": torch.tensor(i)}


class Recording(GAN):
    def training_step(self, batch: dict, batch_idx: int) -> None:
        self.seen.extend(batch["y"].tolist())
        return super().training_step(batch, batch_idx)


def main(out: str) -> None:
    L.seed_everything(0)
    model = Recording(GANConfig(penalty="r1", latent_dim=8, g_channels=8, d_channels=8, d_steps=2),
                      OptimConfig(name="adam", lr=2e-3, betas=[0.5, 0.999]), DataSpec(shape=(1, 8, 8)))
    model.seen = []
    model.configure_manual_optimization(accumulate_grad_batches=2, gradient_clip_val=1.0)
    initial = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    # The strategy as the runtime builds it: DDP with the family's find_unused_parameters.
    ddp = strategy(TrainerConfig(strategy="ddp", accelerator="cpu", devices=2), 4, world=2, family=Recording)
    trainer = L.Trainer(max_steps=6, strategy=ddp, devices=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(model, DataLoader(Indexed(), batch_size=4))
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save({"params": params, "initial": initial, "batches": sorted(model.seen),
                "d_updates": model.optimizer_steps[0], "global_step": trainer.global_step},
               f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
