"""Score family: noise-conditional score networks (NCSN, Song & Ermon 2019) trained by denoising score
matching over a geometric ladder of noise levels and sampled by annealed Langevin dynamics.

Data are mapped to [0, 1] as in the paper. The network is the shared UNet with the level index (spread
over 0..999) as its time input, and the score is s(x, i) = UNet(x, i) / sigma_i (the output scaling of
Song & Ermon 2020, "Improved techniques", sec. 3.3), so DSM's sigma^2-weighted term is 1/2 ||UNet + z||^2.
Objective in `scalegen.objectives.score`, sampler in `scalegen.samplers.langevin`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from scalegen.config.schema import ModelConfig, OptimConfig, ranged
from scalegen.dataspec import DataSpec, images_to_unit, unit_to_images
from scalegen.errors import ConfigError
from scalegen.families.base import GenerativeModel
from scalegen.nets.unet import UNet
from scalegen.objectives.score import dsm_loss
from scalegen.registry import register_family
from scalegen.samplers.langevin import annealed_langevin, geometric_sigmas


@dataclass
class ScoreConfig(ModelConfig):
    family: str = "score"
    # Noise ladder (Song & Ermon 2019 sec. 5: sigma_1 = 1, sigma_L = 0.01, L = 10 for data in [0, 1]).
    sigma_max: float = ranged(1.0, gt=0)  # largest noise level sigma_1
    sigma_min: float = ranged(0.01, gt=0)  # smallest noise level sigma_L
    num_levels: int = ranged(10, ge=1)  # L, levels in geometric progression
    # Annealed Langevin (Algorithm 1: T = 100 steps per level, eps = 2e-5).
    steps_per_level: int = ranged(100, ge=1)  # T
    step_lr: float = ranged(2e-5, gt=0)  # eps; level i uses alpha_i = eps sigma_i^2 / sigma_L^2
    final_denoise: bool = True  # one Tweedie step x + sigma_L^2 s(x, L) at the end (removes the last noise)
    # UNet (conditioned on the level through its time embedding).
    base_channels: int = ranged(64, ge=1)  # channels at full resolution
    channel_mult: list[int] = ranged(ge=1, default_factory=lambda: [1, 2, 2])  # width multiplier per level
    num_res_blocks: int = ranged(2, ge=1)  # residual blocks per resolution
    attn_resolutions: list[int] = ranged(ge=1, default_factory=lambda: [16])  # feature-map sizes with self-attention
    dropout: float = ranged(0.0, ge=0, lt=1)  # residual-block dropout


@register_family("score", ScoreConfig, "Noise-conditional score network (NCSN): DSM + annealed Langevin")
class ScoreModel(GenerativeModel):
    """NCSN; samples by annealed Langevin. No likelihood."""

    predictions = frozenset({"sample"})
    data_kinds = frozenset({"image"})
    nll_kind = "exact"  # unused: the family has no nll
    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(self, cfg: ScoreConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        if cfg.sigma_min >= cfg.sigma_max:
            raise ConfigError(f"model.sigma_min={cfg.sigma_min} must be below model.sigma_max={cfg.sigma_max}")
        c, h, w = data.shape
        self.net = UNet(in_channels=c, resolution=min(h, w), base_channels=cfg.base_channels,
                        channel_mult=tuple(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
                        attn_resolutions=tuple(cfg.attn_resolutions), dropout=cfg.dropout)
        self.register_buffer("sigmas", geometric_sigmas(cfg.sigma_max, cfg.sigma_min, cfg.num_levels),
                             persistent=False)

    def score(self, x: Tensor, levels: Tensor) -> Tensor:
        """s(x, sigma_i) = UNet(x, t_i) / sigma_i with t_i the level index spread over 0..999."""
        t = levels * (999 // max(self.cfg.num_levels - 1, 1))
        return self.net(x, t) / self.sigmas[levels].view(-1, 1, 1, 1)

    def to_unit(self, x: Tensor) -> Tensor:
        return (images_to_unit(x, self.data_spec.levels) + 1) / 2  # [0, 1], as in NCSN

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        loss, levels = dsm_loss(self.score, self.to_unit(batch["x"]), self.sigmas)
        return loss, {"mean_level": levels.float().mean()}

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        """Annealed Langevin from U(0, 1) noise (Song & Ermon 2019 sec. 5), as uint8 images."""
        x0 = torch.rand(n, *self.data_spec.shape, device=self.device)

        def score_at(x: Tensor, i: int) -> Tensor:
            return self.score(x, torch.full((len(x),), i, device=x.device, dtype=torch.long))

        x = annealed_langevin(score_at, x0, self.sigmas, self.cfg.steps_per_level, self.cfg.step_lr,
                              final_denoise=self.cfg.final_denoise)
        return unit_to_images(2 * x - 1, self.data_spec.levels)
