"""Figures written into the run folder during training: samples, reconstructions, loss curve."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from scalegen.plots import save_curves, save_image_grid


class RunFigures(L.Callback):
    """After each validation: samples.png and, where the family declares `reconstruct`, reconstructions.png
    (originals above, reconstructions below). At the end of fitting: loss_curve.png from the metrics file.

    Every rank draws the samples (under ZeRO-3 or FSDP each rank must join every forward pass, as in
    `scalegen.eval`) and rank 0 writes the files."""

    def __init__(self, run_dir: Path, metrics_file: Path, num_samples: int = 64) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_file = Path(metrics_file)
        self.num_samples = num_samples
        self._val_batch: dict | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and self._val_batch is None:
            self._val_batch = {k: v[:16] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.write_images(pl_module, write=trainer.is_global_zero)

    def write_images(self, model, write: bool = True) -> None:
        """Sample (without forcing no_grad: the family decides) and reconstruct; save when `write`."""
        if model.data_spec.kind != "image":
            return
        was_training = model.training
        model.eval()
        if "sample" in model.predictions and self.num_samples:
            samples = model.sample(self.num_samples).detach()
            if write:
                save_image_grid(samples, self.run_dir / "samples.png", nrow=8)
        if "reconstruct" in model.predictions and self._val_batch is not None:
            x, y = self._val_batch["x"], self._val_batch.get("y")
            with torch.no_grad():
                recon = model.reconstruct(x, y)
            if write:
                save_image_grid(torch.cat([x, recon]), self.run_dir / "reconstructions.png", nrow=len(x))
        model.train(was_training)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero and self.metrics_file.exists():
            save_curves(self.metrics_file, self.run_dir / "loss_curve.png")
