"""Diffusion family: DDPM (Ho et al. 2020) with a UNet, linear or cosine schedule, eps or v prediction,
ancestral or DDIM sampling, the variational bound in bits/dim, and the probability-flow ODE's velocity
(so the evaluation runner also reports its ODE likelihood, `bpd_ode`).

The network, objective and sampler live in `scalegen.nets.unet`, `scalegen.objectives.diffusion` and
`scalegen.samplers.diffusion`; this module wires them to the data and to the runtime. EMA weights come
from the shared EMA callback (the recipe's `ema:` section), not from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from scalegen.config.schema import ModelConfig, OptimConfig, choice, ranged
from scalegen.dataspec import DataSpec, images_to_unit, unit_to_images
from scalegen.families.base import GenerativeModel
from scalegen.families.unet_fields import UNetFields, build_unet
from scalegen.objectives.diffusion import NoiseSchedule, diffusion_loss, probability_flow_velocity, q_sample, vlb
from scalegen.registry import register_family
from scalegen.samplers.completion import complete_diffusion, paste
from scalegen.samplers.diffusion import ddim_sample, ddpm_sample


@dataclass
class DiffusionConfig(UNetFields, ModelConfig):
    family: str = "diffusion"
    # Forward process.
    timesteps: int = ranged(1000, ge=1)  # T, number of noising steps (Ho et al. 2020: 1000)
    schedule: str = choice("linear", "cosine")  # beta_t: linear (Ho et al. sec. 4) or cosine (Nichol & Dhariwal)
    beta_start: float = ranged(1e-4, gt=0, lt=1)  # linear schedule's beta_1 at T = 1000 (rescaled by 1000/T otherwise)
    beta_end: float = ranged(0.02, gt=0, lt=1)  # linear schedule's beta_T at T = 1000 (rescaled by 1000/T otherwise)
    # Objective.
    prediction: str = choice("eps", "v")  # target: eps (Ho et al. eq. 14) or v (Salimans & Ho 2022)
    variance: str = choice("beta", "posterior")  # fixed reverse variance: beta_t or beta-tilde_t (sec. 3.2)
    # The UNet: scalegen.families.unet_fields.UNetFields.
    # Sampling.
    sampler: str = choice("ddpm", "ddim")  # ancestral (Ho et al. Alg. 2) or DDIM (Song et al. 2021 eq. 12)
    sample_steps: int = ranged(50, ge=1, le="timesteps")  # DDIM steps, at most T (ignored by ddpm, which takes all T)
    ddim_eta: float = ranged(0.0, ge=0, le=1)  # DDIM stochasticity: 0 = deterministic, 1 = DDPM-like (eq. 16)
    clip_denoised: bool = True  # clip x0-hat to [-1, 1] at every sampling step
    repaint_resample: int = ranged(1, ge=1)  # `complete`: RePaint's r (Lugmayr et al. 2022); 1 = replace only
    # Likelihood.
    nll_timesteps: int = ranged(0, ge=0)  # bound terms per example: 0 = all T; k > 0 = unbiased stratified estimate
    encode_timestep: int = ranged(0, ge=0, lt="timesteps")  # `encode`: pooled UNet bottleneck of x noised to this index


@register_family("diffusion", DiffusionConfig)
class Diffusion(GenerativeModel):
    """DDPM / DDIM with a UNet; nll is the variational bound (Ho et al. 2020 eq. 5) in nats."""

    nll_kind = "vlb"
    predictions = frozenset({"nll", "sample", "encode", "complete", "velocity"})
    data_kinds = frozenset({"image"})

    def __init__(self, cfg: DiffusionConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        self.net = build_unet(cfg, data, self.family_name)
        self.schedule = NoiseSchedule.named(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end)

    def _labels(self, y: Tensor | None) -> Tensor | None:
        return y if self.cfg.class_conditional else None

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x0 = images_to_unit(batch["x"], self.data_spec.levels)
        per_example, i = diffusion_loss(self.net, self.schedule, x0, self._labels(batch.get("y")),
                                        prediction=self.cfg.prediction)
        loss = per_example.mean()
        # Loss in the first and last quarter of timesteps: where training is hard vs. easy.
        quarter = self.schedule.timesteps // 4
        bands = (("loss_t_low", i < max(quarter, 1)), ("loss_t_high", i >= self.schedule.timesteps - quarter))
        # Masked means without reading the mask on the host (no device sync); NaN when a band is empty.
        logs = {name: ((per_example * mask).sum() / mask.sum()).detach() for name, mask in bands}
        return loss, logs

    def nll(self, x: Tensor, y: Tensor | None = None, k: int | None = None) -> Tensor:
        x0 = images_to_unit(x, self.data_spec.levels)
        with torch.no_grad():
            return vlb(self.net, self.schedule, x0, self._labels(y), num_timesteps=self.cfg.nll_timesteps,
                       prediction=self.cfg.prediction, variance=self.cfg.variance,
                       levels=self.data_spec.levels).float()

    def velocity(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """dx/dt of the probability-flow ODE (scalegen.objectives.diffusion) with t = 1 - s: t = 0 is the
        last noise level, taken as the prior N(0, I) (only approximately: alpha-bar_T > 0), t = 1 the
        first (timestep 1), where the data are scored."""
        # dx/dt = -dx/ds with s = 1 - t.
        return -probability_flow_velocity(self.net, self.schedule, x, 1 - t, self._labels(y),
                                          prediction=self.cfg.prediction)

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        noise = torch.randn(n, *self.data_spec.shape, device=self.device)
        y = None if y is None else y.to(self.device)
        common = dict(prediction=self.cfg.prediction, clip_denoised=self.cfg.clip_denoised)
        if self.cfg.sampler == "ddim":
            x = ddim_sample(self.net, self.schedule, noise, self._labels(y), steps=self.cfg.sample_steps,
                            eta=self.cfg.ddim_eta, **common)
        else:
            x = ddpm_sample(self.net, self.schedule, noise, self._labels(y), variance=self.cfg.variance,
                            **common)
        return unit_to_images(x, self.data_spec.levels)

    @property
    def num_labels(self) -> int:
        """Classes the model is conditioned on (0: unconditional)."""
        return self.data_spec.num_classes if self.cfg.class_conditional else 0

    @torch.no_grad()
    def complete(self, x: Tensor, observed: Tensor, y: Tensor | None = None) -> Tensor:
        """x (uint8) inpainted where `observed` (broadcast to x's shape) is False: DDPM ancestral sampling
        with the known region replaced at every step, `repaint_resample` times resampled (always the
        full T steps, whatever `sampler` says)."""
        x, m = x.to(self.device), observed.to(self.device).expand_as(x)
        y = None if y is None else y.to(self.device)
        out = complete_diffusion(self.net, self.schedule, images_to_unit(x, self.data_spec.levels), m,
                                 self._labels(y), resample=self.cfg.repaint_resample,
                                 prediction=self.cfg.prediction, variance=self.cfg.variance,
                                 clip_denoised=self.cfg.clip_denoised)
        return paste(x, unit_to_images(out, self.data_spec.levels), m)

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """UNet bottleneck features (average-pooled) of x noised to `encode_timestep` (0 = almost clean)."""
        x0 = images_to_unit(x, self.data_spec.levels)
        i = torch.full((x0.shape[0],), self.cfg.encode_timestep, device=x0.device, dtype=torch.long)

        xt = q_sample(self.schedule, x0, i, torch.randn_like(x0))
        return self.net(xt, i, self._labels(y), return_features=True).float()
