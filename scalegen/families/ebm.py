"""Energy-based models (IGEBM, Du & Mordatch 2019): a CNN energy E(x), p(x) ∝ exp(-E(x)), trained by
maximum likelihood with negatives from short-run SGLD started from a replay buffer.

Each training step (automatic optimization: the negatives carry no graph to the parameters):
1. chain starts: `batch` entries of this rank's replay buffer, each reset to uniform noise with
   probability `reinit_prob` (IGEBM: 5 %);
2. `sgld_steps` Langevin updates x <- x - (a/2) dE/dx + sigma z, clamped to [-1, 1]
   (`scalegen.samplers.langevin.sgld`, which takes x-gradients under `torch.enable_grad`);
3. loss E(x+) - E(x-) + energy_reg (E(x+)^2 + E(x-)^2) (`scalegen.objectives.ebm.ml_loss`); the chains'
   ends go back into the buffer.

The buffer is per-rank state (`rank_state`): every checkpoint holds each rank's buffer and a resumed run
gives each rank its own back. A divergence guard stops training with a one-line `UserError` naming the
step and the settings to change when |E| or the gradient norm exceed their limits or are not finite.
The steps record a breach on the device only (no host read); the host looks every `guard_every` steps,
before every checkpoint is written and at the end of fitting, on every rank at once. So training stops at
most `guard_every` steps after the breach, every rank together, and no checkpoint is written from
weights updated at or after the step that breached: the last checkpoint holds weights from before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from scalegen.config.schema import ModelConfig, OptimConfig, choice, ranged
from scalegen.dataspec import DataSpec, images_to_unit, unit_to_images
from scalegen.errors import UserError
from scalegen.families.base import GenerativeModel
from scalegen.nets.ebm import EnergyCNN
from scalegen.objectives.ebm import buffer_starts, ml_loss, uniform_images
from scalegen.registry import register_family
from scalegen.samplers.completion import complete_langevin, paste
from scalegen.samplers.langevin import sgld


@dataclass
class EBMConfig(ModelConfig):
    family: str = "ebm"
    widths: list[int] = ranged(ge=1, default_factory=lambda: [64, 128, 256])  # CNN channels per stride-2 stage
    spectral_norm: bool = False  # spectral normalization of every layer (IGEBM sec. 3.3)
    # Short-run SGLD for the negatives (JEM: 20 steps, step 1 on dE/dx, noise 0.01; data in [-1, 1]).
    sgld_steps: int = ranged(20, ge=1)  # Langevin updates per training step
    sgld_step_size: float = ranged(2.0, gt=0)  # a in x <- x - (a/2) dE/dx + sigma z
    sgld_noise: float = ranged(0.01, ge=0)  # sigma (set apart from a, as IGEBM and JEM do)
    sgld_grad_clip: float | None = ranged(None, gt=0)  # bound each chain's dE/dx norm (None = no clipping)
    # Replay buffer (per rank).
    buffer_size: int = ranged(10000, ge=1)  # chains kept per rank
    reinit_prob: float = ranged(0.05, ge=0, le=1)  # chance a chain restarts from uniform noise
    energy_reg: float = ranged(1.0, ge=0)  # alpha of the L2 energy regularizer (IGEBM: 1)
    # Gaussian noise on the training examples (JEM: 0.03): the energy cannot sharpen onto exact pixel values.
    data_noise: float = ranged(0.0, ge=0)
    # Sampling (`sample`).
    sample_from: str = choice("buffer", "noise")  # chain starts: replay-buffer entries or fresh noise
    sample_steps: int = ranged(100, ge=1)  # Langevin updates for `sample`
    # Divergence guard.
    max_energy: float = ranged(1e4, gt=0)  # stop when any |E| of a batch exceeds this
    max_grad_norm: float = ranged(1e5, gt=0)  # stop when the parameters' gradient norm exceeds this
    # Read the guard on the host every N steps (None: trainer.log_every_n_steps) and before every checkpoint.
    guard_every: int | None = ranged(None, ge=1)


@register_family("ebm", EBMConfig, "Energy-based model (IGEBM): CNN energy, SGLD negatives, replay buffer")
class EBM(GenerativeModel):
    """IGEBM-style energy model; samples by Langevin dynamics. No normalized likelihood."""

    predictions = frozenset({"sample", "energy", "complete"})
    data_kinds = frozenset({"image"})
    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(self, cfg: EBMConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        self.net = self.build_net(cfg, data)
        self.buffer: Tensor | None = None  # this rank's replay buffer, [buffer_size, C, H, W] in [-1, 1]
        # The guard's record on the device: (first step that breached a limit or -1, its value, which limit).
        # A plain tensor, not a buffer: DDP would overwrite every rank's with rank 0's.
        self.guard: Tensor | None = None

    def build_net(self, cfg: EBMConfig, data: DataSpec) -> torch.nn.Module:
        return EnergyCNN(data.shape[0], cfg.widths, 1, cfg.spectral_norm)

    def energy(self, x: Tensor) -> Tensor:
        """E(x) for x in [-1, 1] (floats) or uint8 images; shape [B]."""
        if x.dtype == torch.uint8:
            x = images_to_unit(x, self.data_spec.levels)
        return self.net(x).squeeze(1)

    def positives(self, x: Tensor) -> Tensor:
        """The data examples in [-1, 1], with `data_noise` added while training."""
        x = images_to_unit(x, self.data_spec.levels)
        if self.training and self.cfg.data_noise > 0:
            x = x + self.cfg.data_noise * torch.randn_like(x)
        return x

    # ---- negatives --------------------------------------------------------------------------------
    def langevin(self, x0: Tensor, steps: int) -> Tensor:
        c = self.cfg
        return sgld(self.energy, x0, steps, c.sgld_step_size, c.sgld_noise, c.sgld_grad_clip, clamp=(-1.0, 1.0))

    def replay_buffer(self) -> Tensor:
        if self.buffer is None or self.buffer.device != self.device:
            self.buffer = (uniform_images(self.cfg.buffer_size, self.data_spec.shape, self.device)
                           if self.buffer is None else self.buffer.to(self.device))
        return self.buffer

    def negatives(self, n: int, update_buffer: bool = True) -> Tensor:
        buffer = self.replay_buffer()
        starts, idx = buffer_starts(buffer, n, self.cfg.reinit_prob)
        x_neg = self.langevin(starts, self.cfg.sgld_steps)
        if update_buffer:
            buffer[idx] = x_neg
        return x_neg

    # ---- training -----------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x_pos = self.positives(batch["x"])
        x_neg = self.negatives(len(x_pos), update_buffer=self.training)
        e_pos, e_neg = self.energy(x_pos), self.energy(x_neg)
        self.guard_energies(e_pos, e_neg)
        loss, contrastive = ml_loss(e_pos, e_neg, self.cfg.energy_reg)
        return loss, {"energy_data": e_pos.mean().detach(), "energy_samples": e_neg.mean().detach(),
                      "contrastive": contrastive.detach()}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """val/loss: the ML surrogate against the current buffer's chains (no new Langevin steps, no buffer
        update): cheap, and it rises when the energy stops separating data from the model's samples."""
        x_pos = images_to_unit(batch["x"], self.data_spec.levels)
        buffer = self.replay_buffer()
        x_neg = buffer[torch.randint(0, len(buffer), (len(x_pos),), device=buffer.device)]
        e_pos, e_neg = self.energy(x_pos), self.energy(x_neg)
        loss, contrastive = ml_loss(e_pos, e_neg, self.cfg.energy_reg)
        n = len(x_pos)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/energy_data", e_pos.mean(), sync_dist=True, batch_size=n)

    # ---- divergence guard ---------------------------------------------------------------------------
    def _advice(self) -> str:
        return ("lower optim.lr or model.sgld_step_size, raise model.energy_reg, or set model.spectral_norm=true; "
                "the last checkpoint holds the weights from before this step")

    def _record(self, value: Tensor, limit: float, kind: int) -> None:
        """Keep the first breach of `limit` by `value` (a 0-dim tensor) in `self.guard`, on the device."""
        value = value.detach().double()
        if self.guard is None or self.guard.device != value.device:
            self.guard = value.new_full((3,), -1.0)
        first = (~torch.isfinite(value) | (value > limit)) & (self.guard[0] < 0)
        g = self.guard
        self.guard = torch.stack([torch.where(first, float(self.global_step), g[0]), torch.where(first, value, g[1]),
                                  torch.where(first, float(kind), g[2])])

    def guard_energies(self, e_pos: Tensor, e_neg: Tensor) -> None:
        self._record(torch.cat([e_pos.detach(), e_neg.detach()]).abs().max(), self.cfg.max_energy, 0)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        grads = [p.grad.detach().flatten() for p in self.parameters() if p.grad is not None]
        if grads:  # gradients are already all-reduced: every rank records the same norm
            self._record(torch.cat(grads).norm(), self.cfg.max_grad_norm, 1)

    def check_divergence(self) -> None:
        """Raise the guard's one-line error if any rank recorded a breach: one all-gather and one host read,
        so every rank calls it at the same point (each of the hooks below) and every rank raises."""
        if self.guard is None:
            return
        breaches = [row for row in self.all_gather(self.guard).view(-1, 3).tolist() if row[0] >= 0]
        if breaches:
            step, value, kind = min(breaches)  # the earliest, over ranks
            what = (f"|E| reached {value:.3g} (limit model.max_energy={self.cfg.max_energy:g})" if kind == 0 else
                    f"gradient norm {value:.3g} (limit model.max_grad_norm={self.cfg.max_grad_norm:g})")
            raise UserError(f"{self.family_name} training diverged at step {int(step)}: {what}; {self._advice()}")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.cfg.guard_every or self.trainer.log_every_n_steps or 1
        if self.global_step % every == 0:
            self.check_divergence()

    def on_train_end(self) -> None:
        super().on_train_end()
        self.check_divergence()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_divergence()  # before the checkpoint is written (it runs on every rank)
        super().on_save_checkpoint(checkpoint)

    # ---- per-rank state (the replay buffer) ---------------------------------------------------------
    def rank_state(self) -> dict[str, Any]:
        return {} if self.buffer is None else {"buffer": self.buffer.detach().cpu()}

    def load_rank_state(self, state: dict[str, Any], saved_world_size: int, world_size: int) -> None:
        """Own buffer back at the same world size; at another, every saved rank's chains are pooled and
        each rank takes buffer_size of them (rank r from offset r * buffer_size, wrapping around)."""
        if saved_world_size == world_size:
            buffer = state.get("buffer")
        else:
            parts = [s["buffer"] for _, s in sorted(state.items()) if s.get("buffer") is not None]
            pooled = torch.cat(parts) if parts else None
            if pooled is None:
                buffer = None
            else:
                rank = self.global_rank
                idx = (torch.arange(self.cfg.buffer_size) + rank * self.cfg.buffer_size) % len(pooled)
                buffer = pooled[idx]
        self.buffer = None if buffer is None else buffer.to(self.device)

    # ---- sampling --------------------------------------------------------------------------------------
    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        """`sample_steps` Langevin updates from replay-buffer entries or from uniform noise, as images."""
        if self.cfg.sample_from == "buffer":
            buffer = self.replay_buffer()
            x0 = buffer[torch.randint(0, len(buffer), (n,), device=buffer.device)]
        else:
            x0 = uniform_images(n, self.data_spec.shape, self.device)
        return unit_to_images(self.langevin(x0, self.cfg.sample_steps), self.data_spec.levels)

    def complete(self, x: Tensor, observed: Tensor, y: Tensor | None = None) -> Tensor:
        """x (uint8) completed where `observed` (broadcast to x's shape) is False: the missing pixels start
        as uniform noise and take `sample_steps` Langevin updates on E with the observed pixels held."""
        x, m = x.to(self.device), observed.to(self.device).expand_as(x)
        c = self.cfg
        out = complete_langevin(self.energy, images_to_unit(x, self.data_spec.levels), m,
                                uniform_images(len(x), self.data_spec.shape, self.device), c.sample_steps,
                                c.sgld_step_size, c.sgld_noise, c.sgld_grad_clip, clamp=(-1.0, 1.0))
        return paste(x, unit_to_images(out, self.data_spec.levels), m)
