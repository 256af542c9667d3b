"""The contract every model family implements, and the Lightning plumbing they share.

A family subclasses `GenerativeModel`, registers itself with `@register_family`, and implements
`loss` plus whichever of `nll`, `sample`, `encode` apply. Training, validation logging and
optimizers come from here; a family overrides them only where it really differs (GANs use two
optimizers with manual optimization).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from scalegen.config.loader import plain
from scalegen.config.schema import ModelConfig, OptimConfig
from scalegen.dataspec import DataSpec


class GenerativeModel(L.LightningModule):
    """Base class for every family.

    Batches are dicts: `x` (uint8 [B, C, H, W] images, or float [B, 1, T] audio in [-1, 1], or
    int64 mu-law codes [B, 1, T]), `y` (int64 [B], -1 when unlabelled) and `key`.
    """

    family_name: str = ""  # set by @register_family
    # What `nll` returns: "exact", "elbo", "iwae", "vlb" (variational bound). Reports label numbers with it.
    nll_kind: str = "exact"
    # Gradient clipping a family that optimizes manually does itself (`configure_manual_optimization`).
    gradient_clip_val: float | None = None

    def __init__(self, cfg: ModelConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__()
        # Plain dataclasses, not OmegaConf nodes: a family reads its settings in every step (~0.3 ms a
        # step of DictConfig reads for a VAE).
        self.cfg = plain(cfg)
        self.optim_cfg = plain(optim)
        self.data_spec = data

    # ---- the shared API; families implement what applies ------------------------------------
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss and a dict of scalar diagnostics to log."""
        raise NotImplementedError

    def nll(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Per-example negative log-likelihood of the discrete data, in nats, shape [B] (or its bound)."""
        raise NotImplementedError(f"{self.family_name} has no likelihood")

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        """n samples in data space (uint8 images; float or codes for audio)."""
        raise NotImplementedError(f"{self.family_name} cannot sample")

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Features [B, D] for downstream probes."""
        raise NotImplementedError(f"{self.family_name} has no encoder")

    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Reconstructions in data space, for families with an encoder and a decoder."""
        raise NotImplementedError(f"{self.family_name} does not reconstruct")

    def configure_manual_optimization(self, accumulate_grad_batches: int = 1,
                                      gradient_clip_val: float | None = None) -> None:
        """Called by the runtime for families with `automatic_optimization = False` (GANs), which must do
        gradient accumulation and clipping themselves: Lightning rejects both on the Trainer then."""
        if accumulate_grad_batches != 1 or gradient_clip_val:
            from scalegen.errors import UserError

            raise UserError(f"the {self.family_name} family optimizes manually and implements neither gradient "
                            "accumulation nor clipping; unset trainer.accumulate_grad_batches/gradient_clip_val")

    @classmethod
    def capabilities(cls) -> set[str]:
        """Which of nll / sample / encode / reconstruct this family implements."""
        names = ("nll", "sample", "encode", "reconstruct")
        return {n for n in names if getattr(cls, n) is not getattr(GenerativeModel, n)}

    # ---- Lightning plumbing -----------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, logs = self.loss(batch)
        if self.logs_this_step():
            self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["x"]))
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=len(batch["x"]))
        return loss

    def logs_this_step(self) -> bool:
        """Whether to log this training step's scalars: on the steps the Trainer's loggers write (every
        `trainer.log_every_n_steps`), on the first step of each fit and on the last of `max_steps`.

        Training-step values are logged `on_step` only, so on the other steps Lightning would store them
        and drop them unread; each `self.log` costs ~0.1-0.5 ms of Python bookkeeping, as much as a
        small network's whole forward pass. The first step puts every `train/*` key into
        `trainer.callback_metrics` (a checkpoint monitoring one finds it); between logged steps the progress
        bar and `callback_metrics` show the values of the last logged step. True outside a Trainer."""
        trainer = getattr(self, "_trainer", None)
        connector = getattr(trainer, "_logger_connector", None)
        if connector is None:
            return True
        step = int(trainer.global_step)
        if step == getattr(self, "_first_train_step", step) or 0 < trainer.max_steps <= step + 1:
            return True
        try:
            return bool(connector.should_update_logs)
        except Exception:  # a Lightning without this (private) property: log every step, as before
            return True

    def on_train_start(self) -> None:
        self._first_train_step = self.trainer.global_step  # where this fit starts (after a resume too)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, logs = self.loss(batch)
        n = len(batch["x"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, sync_dist=True, batch_size=n)
        if "nll" in self.capabilities():
            from scalegen.metrics.bpd import nats_to_bpd

            nll = self.nll(batch["x"], batch.get("y"))
            self.log("val/bpd", nats_to_bpd(nll.mean(), self.data_spec.dims), sync_dist=True, batch_size=n)

    def configure_optimizers(self) -> Any:
        return self.build_optimizer(self.parameters(), self.total_steps())

    def build_optimizer(self, params: Any, total_steps: int, lr: float | None = None) -> dict[str, Any]:
        """The recipe's optimizer and LR schedule for `params`; every family builds its optimizers here."""
        from scalegen.runtime.optim import build_optimizer

        # The fused CPU kernel, except where Lightning refuses it: clipping gradients under mixed precision.
        trainer = getattr(self, "_trainer", None)
        clips = trainer is not None and bool(trainer.gradient_clip_val or self.gradient_clip_val)
        fuse = not (clips and "mixed" in str(trainer.precision))
        return build_optimizer(params, self.optim_cfg, total_steps, lr=lr, fuse_on_cpu=fuse)

    def total_steps(self) -> int:
        """Optimizer steps the run will take (for LR schedules); 0 when unknown."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return 0
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            return int(trainer.estimated_stepping_batches)
        except Exception:
            return 0
