"""The VQ-VAE prior (van den Oord et al. 2017, Sec. 3.3): a (Gated) PixelCNN over the code maps of a frozen
VQ-VAE, trained as a second stage. The first stage is named by `model.stage1` (a checkpoint or run folder
of the `vqvae` family) and is kept inside this model, frozen, so this model's checkpoint holds both.

Sampling draws a code map from the PixelCNN (ancestrally, raster order) and decodes it. Likelihood:
with the deterministic posterior q(z|x) = delta(z_q(x)),

    -log p(x) <= -log p(x | z_q) - log p_prior(z_q)         (`nll_kind = "bound"`),

the first stage's reconstruction term plus the prior's exact NLL of the codes, in nats of the 8-bit data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scalegen.config.schema import ModelConfig, OptimConfig, choice, ranged
from scalegen.dataspec import DataSpec
from scalegen.errors import ConfigError
from scalegen.families.base import GenerativeModel
from scalegen.nets.pixelcnn import GatedPixelCNN, PixelCNN
from scalegen.objectives.autoregressive import autoregressive_nll
from scalegen.registry import register_family
from scalegen.samplers.autoregressive import sample_image


@dataclass
class VQVAEPriorConfig(ModelConfig):
    family: str = "vqvae_prior"
    stage1: str | None = None  # the frozen VQ-VAE: a checkpoint or run folder of the vqvae family
    architecture: str = choice("gated", "pixelcnn")  # Gated PixelCNN (2016b) or PixelCNN (2016a)
    hidden_channels: int = ranged(64, ge=1)  # feature maps per layer
    num_layers: int = ranged(8, ge=1)  # gated layers / residual blocks
    kernel_size: int = ranged(3, ge=1)  # kernel of the later layers (odd)
    first_kernel_size: int = ranged(7, ge=1)  # kernel of the first, type-A masked layer (odd)
    out_hidden_channels: int = ranged(256, ge=1)  # channels of the 1x1 output head
    conditional: bool = False  # class-conditional prior p(z | y)
    temperature: float = ranged(1.0, ge=0)  # sampling temperature of the code softmax (0 = argmax)


@register_family("vqvae_prior", VQVAEPriorConfig, "PixelCNN prior over a frozen VQ-VAE's codes (second stage)")
class VQVAEPrior(GenerativeModel):
    """Second stage: an autoregressive prior over the codes of a frozen VQ-VAE."""

    predictions = frozenset({"nll", "sample", "encode", "reconstruct"})
    nll_kind = "bound"
    monitor = "val/loss"

    def __init__(self, cfg: VQVAEPriorConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        stage1 = self.load_stage1()  # frozen, through the one checkpoint reader; its sha256 is recorded
        if stage1.family_name != "vqvae":
            raise ConfigError(f"model.stage1 is a {stage1.family_name!r} model; the prior needs a vqvae checkpoint")
        if tuple(stage1.data_spec.shape) != tuple(data.shape):
            raise ConfigError(f"model.stage1 was trained on {tuple(stage1.data_spec.shape)} images, the data has "
                              f"{tuple(data.shape)}: train the prior on the first stage's dataset")
        if cfg.conditional and data.num_classes <= 0:
            raise ConfigError("model.conditional=true needs a labelled dataset (data spec has no classes)")
        self.stage1 = stage1
        self.num_codes = int(stage1.cfg.num_codes)
        with torch.no_grad():
            self.code_shape = tuple(stage1.encode_codes(torch.zeros(1, *data.shape, dtype=torch.uint8)).shape[1:])
        net_cls = GatedPixelCNN if cfg.architecture == "gated" else PixelCNN
        self.prior: nn.Module = net_cls(
            data_channels=1, levels=self.num_codes, hidden=cfg.hidden_channels, num_layers=cfg.num_layers,
            kernel_size=cfg.kernel_size, first_kernel_size=cfg.first_kernel_size,
            out_hidden=cfg.out_hidden_channels, num_classes=data.num_classes if cfg.conditional else 0,
        )

    def train(self, mode: bool = True) -> VQVAEPrior:
        super().train(mode)
        self.stage1.eval()  # frozen: never in training mode (no codebook updates)
        return self

    def configure_optimizers(self):
        return self.build_optimizer(self.prior.parameters(), self.total_steps())

    def _labels(self, y: Tensor | None) -> Tensor | None:
        return y if self.cfg.conditional else None

    def prior_nll(self, codes: Tensor, y: Tensor | None = None) -> Tensor:
        """Exact -log p_prior(codes [| y]) in nats [B] for code maps [B, h, w]."""
        target = codes.unsqueeze(1)
        return autoregressive_nll(self.prior(target, self._labels(y)), target)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            codes = self.stage1.encode_codes(batch["x"])
        nll = self.prior_nll(codes, batch.get("y"))
        bits_per_code = nll.mean() / (codes[0].numel() * math.log(2))
        return bits_per_code, {"prior_bits_per_code": bits_per_code.detach(),
                               "uniform_bits_per_code": torch.tensor(math.log2(self.num_codes))}

    def nll(self, x: Tensor, y: Tensor | None = None, k: int | None = None) -> Tensor:
        """-log p(x | z_q) - log p_prior(z_q): the two-stage upper bound on -log p(x), nats [B]."""
        with torch.no_grad():
            codes = self.stage1.encode_codes(x)
            recon = self.stage1.recon_nll(x, self.stage1.quantizer.lookup(codes))
        return recon + self.prior_nll(codes, y)

    @torch.no_grad()
    def sample_codes(self, n: int, y: Tensor | None = None, temperature: float | None = None) -> Tensor:
        """n code maps [n, h, w] drawn from the prior."""
        if self.cfg.conditional and y is None:
            y = torch.arange(n, device=self.device) % self.data_spec.num_classes
        t = self.cfg.temperature if temperature is None else temperature
        codes = sample_image(self.prior, (1, *self.code_shape), n, self._labels(y), t, dtype=torch.long)  # type: ignore[arg-type]
        return codes[:, 0]

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, temperature: float | None = None) -> Tensor:
        """n uint8 images: codes from the prior, decoded by the first stage (its decoder means)."""
        return self.stage1.decode_codes(self.sample_codes(n, y, temperature))

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.stage1.encode(x)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.stage1.reconstruct(x)
