"""GAN family: DCGAN (Radford et al. 2016) with non-saturating or hinge loss, optional R1 or gradient
penalty, and k discriminator updates per generator update, trained with Lightning's manual optimization.

How the two networks are stepped (`training_step`), through the shared manual-optimization mechanism
(`GenerativeModel.manual_update`, which does accumulation, clipping of each network's global gradient
norm, mixed precision and each network's LR schedule):
- Each training batch is one discriminator micro-batch: fakes from G (no graph), the D loss on real
  vs. fake (+ penalty). After `accumulate_grad_batches` micro-batches D steps once.
- After every `d_steps` discriminator updates the generator steps once, on `accumulate_grad_batches`
  fresh batches of fakes of the same size (so G sees the same effective batch as D), taken after D's
  update, exactly as without accumulation.
- `manual_update` freezes the other network's parameters during each forward and backward
  (`toggle_optimizer`), so D's gradients never receive the G loss and vice versa; under DDP each
  backward then reduces only the network being stepped, which is why this family declares
  `ddp_find_unused_parameters = True` (read by scalegen.distributed when it builds the strategy).

Step counting: under manual optimization Lightning's `global_step` (and so `trainer.max_steps`)
counts every optimizer step of both networks: with d_steps = k, a run of max_steps = N takes
N k/(k+1) discriminator and N/(k+1) generator steps. LR schedules are sized accordingly.

A GAN's losses do not measure its samples, so it has no `monitor`: no "best" checkpoint, only
last.ckpt (and periodic ones); `checkpoint.monitor` can name a sample metric computed during training.

EMA: the shared EMA callback (recipe `ema:` section) averages both networks; sampling with
`use_for_eval` uses the averaged generator (Karras et al. 2018; Yazici et al. 2019).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from scalegen.config.schema import ModelConfig, OptimConfig, choice, ranged
from scalegen.dataspec import DataSpec, images_to_unit, unit_to_images
from scalegen.errors import UserError
from scalegen.families.base import GenerativeModel, recipe_shapes
from scalegen.nets.dcgan import Discriminator, Generator
from scalegen.objectives.gan import (
    clip_weights,
    critic_emd,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    r1_penalty,
)
from scalegen.registry import register_family

D, G = 0, 1  # optimizer indices, in configure_optimizers order


@dataclass
class GANConfig(ModelConfig):
    family: str = "gan"
    # Goodfellow et al. 2014 sec. 3 (non-saturating) or eq. 1 (minimax), hinge (Lim & Ye 2017), or the
    # WGAN critic (Arjovsky et al. 2017; with weight_clip or penalty=gp, d_steps = n_critic = 5, d_norm=none)
    loss: str = choice("non_saturating", "minimax", "hinge", "wasserstein")
    weight_clip: float | None = ranged(None, gt=0)  # clip D's weights to [-c, c] after each update (WGAN: 0.01)
    penalty: str = choice("none", "r1", "gp")  # R1 on reals (Mescheder et al. 2018 eq. 9) or WGAN-GP
    penalty_weight: float = ranged(10.0, ge=0)  # gamma for R1 (the penalty is gamma/2 E||grad D||^2), lambda for gp
    d_steps: int = ranged(1, ge=1)  # discriminator updates per generator update (k in Goodfellow et al. Algorithm 1)
    latent_dim: int = ranged(100, ge=1)  # z ~ N(0, I) of this size (Radford et al.: 100, uniform)
    g_channels: int = ranged(64, ge=1)  # generator width at its last hidden layer; doubles per halving of resolution
    d_channels: int = ranged(64, ge=1)  # discriminator width at its first layer; doubles per halving of the resolution
    g_norm: str = choice("batch", "none")  # generator normalization (Radford et al.: batch norm)
    d_norm: str = choice("batch", "none")  # discriminator normalization; use "none" with gp
    min_resolution: int = ranged(4, ge=1)  # smallest feature map (32 -> 4, 28 -> 7, 8 -> 4)
    lr_g: float | None = ranged(None, gt=0)  # generator learning rate; None = optim.lr
    lr_d: float | None = ranged(None, gt=0)  # discriminator learning rate; None = optim.lr


@register_family("gan", GANConfig)
class GAN(GenerativeModel):
    """DCGAN with non-saturating/hinge loss, R1/GP, k D-steps per G-step (manual optimization)."""

    predictions = frozenset({"sample", "encode"})
    data_kinds = frozenset({"image"})
    monitor = None  # the discriminator's loss would pick an arbitrary checkpoint
    ddp_find_unused_parameters = True  # each backward reaches one network only

    def __init__(self, cfg: GANConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        channels, height, width = data.shape
        if height != width:
            raise UserError(f"the {self.family_name} family needs square images [C, H, H]; the data are "
                            f"{height}x{width}: set data.center_crop={min(height, width)} "
                            "(or data.resize and data.center_crop)")
        self.automatic_optimization = False
        self.last_g_loss: Tensor | None = None  # the latest generator step's loss, logged on the loggers' steps
        with recipe_shapes(self.family_name):
            self.generator = Generator(cfg.latent_dim, channels, height, cfg.g_channels, cfg.g_norm,
                                       cfg.min_resolution)
            self.discriminator = Discriminator(channels, height, cfg.d_channels, cfg.d_norm, cfg.min_resolution)

    def configure_optimizers(self) -> Any:
        total, k = self.total_steps(), self.cfg.d_steps
        d_total, g_total = (total * k) // (k + 1), total // (k + 1)
        return [
            self.build_optimizer(self.discriminator.parameters(), d_total, lr=self.cfg.lr_d),
            self.build_optimizer(self.generator.parameters(), g_total, lr=self.cfg.lr_g),
        ]

    # ---- objectives ------------------------------------------------------------------------------
    def _z(self, n: int) -> Tensor:
        return torch.randn(n, self.cfg.latent_dim, device=self.device)

    def _d_objective(self, real: Tensor, fake: Tensor, with_penalty: bool
                     ) -> tuple[Tensor, dict[str, Tensor]]:
        penalty = self.cfg.penalty if with_penalty else "none"
        if penalty == "r1":
            real = real.detach().requires_grad_(True)
        d_real, d_fake = self.discriminator(real), self.discriminator(fake)
        loss = discriminator_loss(d_real, d_fake, self.cfg.loss)
        logs = {"d_loss": loss.detach(), "d_real": d_real.detach().float().mean(),
                "d_fake": d_fake.detach().float().mean()}
        if self.cfg.loss == "wasserstein":  # the critic's estimate of the earth mover's distance
            logs["emd"] = critic_emd(d_real.detach(), d_fake.detach())
        if penalty == "r1":
            r1 = r1_penalty(d_real, real)
            loss = loss + 0.5 * self.cfg.penalty_weight * r1  # gamma / 2 (Mescheder et al. eq. 9)
            logs["r1"] = r1.detach()
        elif penalty == "gp":
            gp = gradient_penalty(self.discriminator, real, fake)
            loss = loss + self.cfg.penalty_weight * gp
            logs["gp"] = gp.detach()
        return loss, logs

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss (no penalty) on a batch; the generator's loss among the diagnostics.

        Used for validation; training steps the two networks in `training_step`.
        """
        real = images_to_unit(batch["x"], self.data_spec.levels)
        fake = self.generator(self._z(real.shape[0]))
        d_loss, logs = self._d_objective(real, fake, with_penalty=False)
        logs["g_loss"] = generator_loss(self.discriminator(fake), self.cfg.loss).detach()
        return d_loss, logs

    # ---- training: alternating updates under manual optimization --------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        real = images_to_unit(batch["x"], self.data_spec.levels)
        n = real.shape[0]
        logs: dict[str, Tensor] = {}

        def d_loss() -> Tensor:
            with torch.no_grad():
                fake = self.generator(self._z(n))
            loss, d_logs = self._d_objective(real, fake, with_penalty=True)
            logs.update(d_logs)
            return loss

        def g_loss() -> Tensor:
            return generator_loss(self.discriminator(self.generator(self._z(n))), self.cfg.loss)

        _, d_update = self.manual_update(D, d_loss)
        if d_update and self.cfg.weight_clip:  # WGAN: keep the critic K-Lipschitz after each update
            clip_weights(self.discriminator, self.cfg.weight_clip)
        # Generator step after every d_steps discriminator updates, against the updated D.
        if d_update and self.optimizer_steps[D] % self.cfg.d_steps == 0:
            g_total = sum(self.manual_update(G, g_loss)[0] for _ in range(self.accumulate_grad_batches))
            self.last_g_loss = g_total / self.accumulate_grad_batches

        if self.logs_this_step():
            if self.last_g_loss is not None:
                self.log("train/g_loss", self.last_g_loss, batch_size=n)
            self.log("train/loss", logs["d_loss"], batch_size=n)  # the discriminator's loss
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=n)

    # ---- the shared API --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        return unit_to_images(self.generator(self._z(n)), self.data_spec.levels)

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Discriminator features: each layer max-pooled to 4x4, concatenated (Radford et al. sec. 5.1)."""
        return self.discriminator.features(images_to_unit(x, self.data_spec.levels)).float()
