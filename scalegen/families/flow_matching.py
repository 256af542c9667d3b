"""Flow matching family: a UNet velocity field trained on conditional optimal-transport paths (Lipman et
al. 2023; rectified flow at sigma_min = 0, Liu et al. 2023), sampled by integrating dx/dt = v(x, t)
from noise (t = 0) to data (t = 1) with Euler, Heun or an adaptive solver.

The network, objective and ODE solver live in `scalegen.nets.unet`, `scalegen.objectives.flow_matching`
and `scalegen.samplers.ode`; this module wires them to the data. The family has no `nll` of its own: it
declares `velocity`, from which the evaluation runner computes the ODE likelihood. Optional class
conditioning with classifier-free guidance (Ho & Salimans 2022): labels dropped during training with
probability `label_dropout`, and sampling with v_u + w (v_c - v_u).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from scalegen.config.schema import ModelConfig, OptimConfig, choice, ranged
from scalegen.dataspec import DataSpec, images_to_unit, unit_to_images
from scalegen.errors import ConfigError
from scalegen.families.base import GenerativeModel
from scalegen.families.unet_fields import UNetFields, build_unet
from scalegen.objectives.flow_matching import flow_matching_loss, sample_times
from scalegen.registry import register_family
from scalegen.samplers.ode import integrate

# The UNet's sinusoidal embedding was laid out for DDPM's timestep indices 0..999; t in [0, 1] is scaled
# onto that range so its frequencies resolve the path (t itself would leave most of them constant).
TIME_SCALE = 1000.0


@dataclass
class FlowMatchingConfig(UNetFields, ModelConfig):
    family: str = "flow_matching"
    # Probability path and objective.
    sigma_min: float = ranged(0.0, ge=0, lt=1)  # path std at the data end (Lipman et al. eq. 20); 0 = rectified flow
    time_sampling: str = choice("uniform", "logit_normal")  # t ~ U[0, 1], or sigmoid(N(0, 1)) (Esser et al. 2024)
    # The UNet (the diffusion family's): scalegen.families.unet_fields.UNetFields.
    label_dropout: float = ranged(0.0, ge=0, lt=1)  # training labels replaced by "none" with this probability (CFG)
    guidance_scale: float = ranged(1.0, ge=0)  # sampling field v_u + w (v_c - v_u): 1 = conditional, 0 = unconditional
    # Sampling: integrate dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data).
    sampler: str = choice("euler", "heun", "adaptive")  # fixed-step Euler or Heun, or dopri5 with sample_rtol/atol
    sample_steps: int = ranged(50, ge=1)  # Euler/Heun steps (Heun: 2 network passes a step); ignored by adaptive
    sample_rtol: float = ranged(1e-5, gt=0)  # adaptive solver's relative tolerance
    sample_atol: float = ranged(1e-5, gt=0)  # adaptive solver's absolute tolerance


@register_family("flow_matching", FlowMatchingConfig, "flow matching / rectified flow: UNet velocity, ODE sampling")
class FlowMatching(GenerativeModel):
    """Conditional OT flow matching with a UNet velocity field; samples by ODE integration."""

    predictions = frozenset({"sample", "velocity"})
    data_kinds = frozenset({"image"})

    def __init__(self, cfg: FlowMatchingConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        guided = cfg.label_dropout > 0 or cfg.guidance_scale != 1
        if guided and not cfg.class_conditional:
            raise ConfigError("model.label_dropout and model.guidance_scale (classifier-free guidance) need "
                              "model.class_conditional=true")
        if cfg.guidance_scale != 1 and cfg.label_dropout == 0:
            raise ConfigError("model.guidance_scale != 1 needs model.label_dropout > 0: the unconditional "
                              "velocity is trained only on dropped labels")
        self.net = build_unet(cfg, data, self.family_name)

    def _labels(self, y: Tensor | None) -> Tensor | None:
        return y if self.cfg.class_conditional else None

    @property
    def num_labels(self) -> int:
        """Classes the model is conditioned on (0: unconditional); `scalegen sample --class` reads it."""
        return self.data_spec.num_classes if self.cfg.class_conditional else 0

    def velocity(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """dx/dt at images x in [-1, 1] and times t [B] in [0, 1] (0 = noise, 1 = data)."""
        return self.net(x, t * TIME_SCALE, self._labels(y))

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x1 = images_to_unit(batch["x"], self.data_spec.levels)
        y = self._labels(batch.get("y"))
        if y is not None and self.cfg.label_dropout > 0:  # -1 = "no label": the unconditional velocity
            y = torch.where(torch.rand(y.shape, device=y.device) < self.cfg.label_dropout, -1, y)
        t = sample_times(len(x1), self.cfg.time_sampling, x1.device)
        loss = flow_matching_loss(self.velocity, x1, torch.randn_like(x1), t, y, self.cfg.sigma_min).mean()
        return loss, {}

    def guided_velocity(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The sampling field: `velocity`, or with labels and guidance_scale w != 1, v_u + w (v_c - v_u)."""
        v = self.velocity(x, t, y)
        w = self.cfg.guidance_scale
        if y is None or w == 1:
            return v
        v_u = self.velocity(x, t, None)
        return v_u + w * (v - v_u)

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        noise = torch.randn(n, *self.data_spec.shape, device=self.device)
        y = None if y is None else y.to(self.device)
        x = integrate(lambda t, x: self.guided_velocity(x, t.expand(n), y), noise, 0.0, 1.0,
                      method=self.cfg.sampler, steps=self.cfg.sample_steps, rtol=self.cfg.sample_rtol,
                      atol=self.cfg.sample_atol)
        return unit_to_images(x, self.data_spec.levels)
