"""Normalizing flows on 8-bit images: RealNVP (Dinh et al. 2017) and Glow (Kingma & Dhariwal 2018).

Trained by maximum likelihood on uniformly dequantized pixels; `nll` is the exact flow density of
the dequantized image turned into nats of the 8-bit data (scalegen.objectives.flow); `sample`
draws with a temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from scalegen.config.schema import ModelConfig, OptimConfig, choice, ranged
from scalegen.dataspec import DataSpec
from scalegen.errors import UserError
from scalegen.families.base import GenerativeModel
from scalegen.nets.flows import ActNorm, MultiScaleFlow, glow, realnvp
from scalegen.objectives.flow import LEVELS, flow_nll, quantize
from scalegen.registry import register_family


@dataclass
class FlowConfig(ModelConfig):
    family: str = "flow"
    architecture: str = choice("glow", "realnvp")  # Glow (1x1 convs, ActNorm) or RealNVP (masked couplings)
    num_scales: int = ranged(3, ge=1)  # RealNVP scales / Glow levels L; H, W divide by 2^(L-1) (RealNVP) or 2^L (Glow)
    steps_per_scale: int = ranged(32, ge=1)  # Glow: flow steps K per level; RealNVP: fixed 3 + 3 per scale
    hidden_channels: int = ranged(512, ge=1)  # channels of each coupling's s,t network
    num_blocks: int = ranged(8, ge=0)  # RealNVP: residual blocks per s,t network (Glow uses its 3-conv NN(), i.e. 0)
    coupling: str = choice("affine", "additive")  # Glow: affine (sigmoid scale) or additive (NICE)
    lu: bool = True  # Glow: LU-parameterized 1x1 conv (O(C) log-det, Eq. 10) instead of slogdet of a full W
    learned_prior: bool = True  # Glow: factored-out halves scored under N(mu(h), sigma(h)) from the kept half
    actnorm: bool = False  # RealNVP: ActNorm before every coupling (in place of the paper's batch norm)
    logit_alpha: float = ranged(0.05, gt=0, lt=0.5)  # RealNVP: model logit(alpha + (1 - 2 alpha) u) (Dinh et al. 4.1)
    temperature: float = ranged(1.0, ge=0)  # default sampling temperature: latents ~ N(0, T^2) (Glow Sec. 5)


@register_family("flow", FlowConfig, "normalizing flows: RealNVP and Glow, exact bits/dim")
class FlowModel(GenerativeModel):
    """RealNVP / Glow image flow with exact likelihood."""

    predictions = frozenset({"nll", "sample"})
    nll_kind = "exact"

    def __init__(self, cfg: FlowConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        if data.kind != "image" or len(data.shape) != 3:
            raise UserError(f"the flow family models images [C, H, W], not {data.kind} {data.shape}")
        shape = tuple(int(s) for s in data.shape)
        try:
            if cfg.architecture == "realnvp":
                self.net: MultiScaleFlow = realnvp(shape, cfg.num_scales, cfg.hidden_channels, cfg.num_blocks,
                                                   cfg.logit_alpha, cfg.actnorm)
            else:
                self.net = glow(shape, cfg.num_scales, cfg.steps_per_scale, cfg.hidden_channels, cfg.lu,
                                cfg.coupling, cfg.learned_prior)
        except ValueError as err:
            raise UserError(f"model.num_scales={cfg.num_scales}: {err}; lower model.num_scales") from None

    def nll(self, x: Tensor, y: Tensor | None = None, k: int | None = None) -> Tensor:
        return flow_nll(self.net.log_prob, x, LEVELS)

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.initialize_actnorm(batch["x"])

    def initialize_actnorm(self, x: Tensor) -> None:
        """Glow's data-dependent ActNorm initialization (Sec. 3.1), agreed across ranks: before the first
        step, one no-grad pass over this batch in which each ActNorm sets itself from its input's
        statistics averaged over ranks (through the strategy's documented `reduce`), so every DDP
        replica starts from the same parameters. A no-op once initialized (the flag is checkpointed)."""
        pending = [m for m in self.net.modules() if isinstance(m, ActNorm) and not m.is_initialized()]
        if not pending:
            return
        trainer = self.attached_trainer()
        average = None if trainer is None else (lambda s: trainer.strategy.reduce(s, reduce_op="mean"))
        hooks = [m.register_forward_pre_hook(lambda m, args: m.initialize(args[0], average)) for m in pending]
        try:
            with torch.no_grad():
                self.nll(x)
        finally:
            for hook in hooks:
                hook.remove()

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch["x"]
        nll = self.nll(x)
        bpd = nll.mean() / (self.data_spec.dims * math.log(2))  # scale-free objective: bits/dim
        return bpd, {"bpd": bpd.detach()}

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, temperature: float | None = None) -> Tensor:
        """n uint8 images [n, C, H, W]; unconditional (y is ignored)."""
        t = self.cfg.temperature if temperature is None else temperature
        u = self.net.sample(n, t)
        return quantize(u.float(), LEVELS)
