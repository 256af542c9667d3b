"""GAN family: DCGAN (Radford et al. 2016) with non-saturating or hinge loss, optional R1 or gradient
penalty, and k discriminator updates per generator update, trained with Lightning's manual optimization.

How the two networks are stepped (`training_step`):
- Each training batch is one discriminator micro-batch: fakes from G (no graph), the D loss on real
  vs. fake (+ penalty), `manual_backward`. After `accumulate_grad_batches` micro-batches D steps once.
- After every `d_steps` discriminator updates the generator steps once, on `accumulate_grad_batches`
  fresh batches of fakes of the same size (so G sees the same effective batch as D), taken after D's
  update, exactly as without accumulation.
- `toggle_optimizer` freezes the other network's parameters during each backward, so D's gradients
  never receive the G loss and vice versa, and under DDP each backward reduces only the parameters of
  the network being stepped (`setup` turns on DDP's find_unused_parameters for this).

Gradient accumulation and clipping are done here, explicitly: Lightning rejects
`Trainer(accumulate_grad_batches>1)` and `Trainer(gradient_clip_val=...)` for manual optimization.
The runtime passes `trainer.accumulate_grad_batches` (or the value derived from
`trainer.global_batch_size`) and `trainer.gradient_clip_val` to `configure_manual_optimization` and
builds the Trainer without them. Clipping (of the global gradient norm, per network) happens in
`on_before_optimizer_step`, which Lightning calls after unscaling the gradients under 16-bit mixed
precision and before the step, so the threshold applies to true gradients.

Step counting: under manual optimization Lightning's `global_step` (and so `trainer.max_steps`)
counts every optimizer step of both networks: with d_steps = k, a run of max_steps = N takes
N k/(k+1) discriminator and N/(k+1) generator steps. LR schedules are sized accordingly.

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
from scalegen.families.base import GenerativeModel
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


@dataclass
class GANConfig(ModelConfig):
    family: str = "gan"
    # Goodfellow et al. 2014 sec. 3 (non-saturating) or eq. 1 (minimax), hinge (Lim & Ye 2017), or the
    # WGAN critic (Arjovsky et al. 2017; with weight_clip or penalty=gp, d_steps = n_critic = 5, d_norm=none)
    loss: str = choice("non_saturating", "minimax", "hinge", "wasserstein")
    weight_clip: float | None = ranged(None, gt=0)  # clip D's weights to [-c, c] after each update (WGAN: 0.01)
    penalty: str = choice("none", "r1", "gp")  # R1 on reals (Mescheder et al. 2018 eq. 9) or WGAN-GP
    penalty_weight: float = 10.0  # gamma for R1 (the penalty is gamma/2 E||grad D||^2), lambda for gp
    d_steps: int = 1  # discriminator updates per generator update (k in Goodfellow et al. Algorithm 1)
    latent_dim: int = 100  # z ~ N(0, I) of this size (Radford et al.: 100, uniform)
    g_channels: int = 64  # generator width at its last hidden layer; doubles per halving of the resolution
    d_channels: int = 64  # discriminator width at its first layer; doubles per halving of the resolution
    g_norm: str = choice("batch", "none")  # generator normalization (Radford et al.: batch norm)
    d_norm: str = choice("batch", "none")  # discriminator normalization; use "none" with gp
    min_resolution: int = 4  # smallest feature map (32 -> 4, 28 -> 7, 8 -> 4)
    lr_g: float | None = None  # generator learning rate; None = optim.lr
    lr_d: float | None = None  # discriminator learning rate; None = optim.lr


@register_family("gan", GANConfig)
class GAN(GenerativeModel):
    """DCGAN with non-saturating/hinge loss, R1/GP, k D-steps per G-step (manual optimization)."""

    def __init__(self, cfg: GANConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        if data.kind != "image":
            raise ValueError(f"the GAN family models images; got {data.kind!r} data")
        if cfg.d_steps < 1:
            raise ValueError(f"model.d_steps must be >= 1, got {cfg.d_steps}")
        channels, height, width = data.shape
        if height != width:
            raise ValueError(f"DCGAN needs square images, got {height}x{width}")
        self.automatic_optimization = False
        self.generator = Generator(cfg.latent_dim, channels, height, cfg.g_channels, cfg.g_norm,
                                   cfg.min_resolution)
        self.discriminator = Discriminator(channels, height, cfg.d_channels, cfg.d_norm, cfg.min_resolution)
        self.accumulate_grad_batches = 1
        self._micro_batches = 0  # discriminator micro-batches seen (checkpointed)
        self._d_updates = 0  # discriminator optimizer steps taken (checkpointed)

    # ---- settings Lightning leaves to manual optimization ------------------------------------------
    def configure_manual_optimization(self, accumulate_grad_batches: int = 1,
                                      gradient_clip_val: float | None = None) -> None:
        """Take over accumulation and clipping (the runtime calls this; Lightning cannot do them here)."""
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        self.gradient_clip_val = gradient_clip_val

    def configure_optimizers(self) -> Any:
        total, k = self.total_steps(), self.cfg.d_steps
        d_total, g_total = (total * k) // (k + 1), total // (k + 1)
        return [
            self.build_optimizer(self.discriminator.parameters(), d_total, lr=self.cfg.lr_d),
            self.build_optimizer(self.generator.parameters(), g_total, lr=self.cfg.lr_g),
        ]

    def setup(self, stage: str) -> None:
        """Adapt the distributed strategy before it wraps the model (Lightning calls this hook first).

        Under DDP each backward here reaches only one network's parameters (the other is frozen by
        `toggle_optimizer`), so the reducer must be told that some parameters go unused in a backward:
        find_unused_parameters=True. Setting it here keeps the runtime free of per-family switches.
        """
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            from scalegen.errors import UserError

            raise UserError("the gan family steps two optimizers, which Lightning's DeepSpeed strategy "
                            "does not support; use trainer.strategy=ddp")
        if isinstance(strategy, DDPStrategy) and hasattr(strategy, "_ddp_kwargs"):
            strategy._ddp_kwargs["find_unused_parameters"] = True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val,
                                gradient_clip_algorithm="norm")

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
        opt_d, opt_g = self.optimizers()
        sched_d, sched_g = self.lr_schedulers()
        accumulate = self.accumulate_grad_batches
        real = images_to_unit(batch["x"], self.data_spec.levels)
        n = real.shape[0]

        # Discriminator micro-step.
        self.toggle_optimizer(opt_d)
        with torch.no_grad():
            fake = self.generator(self._z(n))
        d_loss, logs = self._d_objective(real, fake, with_penalty=True)
        self.manual_backward(d_loss / accumulate)  # mean over the accumulated micro-batches
        self._micro_batches += 1
        d_update = self._micro_batches % accumulate == 0
        if d_update:
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            if self.cfg.weight_clip:  # WGAN: keep the critic K-Lipschitz
                clip_weights(self.discriminator, self.cfg.weight_clip)
            sched_d.step()
            self._d_updates += 1
        self.untoggle_optimizer(opt_d)

        # Generator step after every d_steps discriminator updates, against the updated D.
        if d_update and self._d_updates % self.cfg.d_steps == 0:
            self.toggle_optimizer(opt_g)
            g_total = 0.0
            for _ in range(accumulate):
                g_loss = generator_loss(self.discriminator(self.generator(self._z(n))), self.cfg.loss)
                self.manual_backward(g_loss / accumulate)
                g_total += g_loss.detach() / accumulate
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            sched_g.step()
            self.untoggle_optimizer(opt_g)
            self.log("train/g_loss", g_total, prog_bar=True, batch_size=n)

        if self.logs_this_step():
            self.log("train/loss", logs["d_loss"], prog_bar=True, batch_size=n)  # the discriminator's loss
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=n)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gan_counters"] = {"micro_batches": self._micro_batches, "d_updates": self._d_updates}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("gan_counters", {})
        self._micro_batches = int(counters.get("micro_batches", 0))
        self._d_updates = int(counters.get("d_updates", 0))

    # ---- the shared API --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        return unit_to_images(self.generator(self._z(n)), self.data_spec.levels)

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Discriminator features: each layer max-pooled to 4x4, concatenated (Radford et al. sec. 5.1)."""
        return self.discriminator.features(images_to_unit(x, self.data_spec.levels)).float()
