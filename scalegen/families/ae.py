"""Autoencoders: plain, denoising (Vincent et al. 2008) and sparse (L1 on the code, or k-sparse,
Makhzani & Frey 2014), with MLP, conv or linear networks.

There is no likelihood: the family predicts `encode` (features for the probes) and `reconstruct`
only, so evaluation reports probes and reconstruction error, never bits/dim. The training loss is the
reconstruction error of the clean image from the (possibly corrupted) input, plus the sparsity
penalty; validation measures the reconstruction of uncorrupted inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scalegen.config.schema import ModelConfig, OptimConfig, choice, ranged
from scalegen.dataspec import DataSpec
from scalegen.errors import ConfigError
from scalegen.families.base import GenerativeModel
from scalegen.nets.conv import ConvDecoder, ConvEncoder
from scalegen.nets.mlp import MLP
from scalegen.registry import register_family


@dataclass
class AEConfig(ModelConfig):
    family: str = "ae"
    net: str = choice("mlp", "conv", "linear")  # linear: one affine map each way (spans PCA, see the tests)
    hidden: list[int] = ranged(None, ge=1, default_factory=lambda: [256, 128])  # MLP widths / conv channels
    code_dim: int = ranged(32, ge=1)  # dimension of the code h = encoder(x)
    recon: str = choice("mse", "bce")  # squared error on [0,1] pixels, or Bernoulli cross-entropy (logits)
    denoise: str = choice("none", "gaussian", "mask")  # corrupt the input in training (denoising AE)
    noise_std: float = ranged(0.3, ge=0)  # denoise=gaussian: std of the added noise on [0,1] pixels
    mask_prob: float = ranged(0.25, ge=0, lt=1)  # denoise=mask: probability a pixel is set to 0
    sparsity: str = choice("none", "l1", "topk")  # L1 penalty on the code, or keep its k largest entries
    l1_weight: float = ranged(1e-3, ge=0)  # sparsity=l1: weight of the L1 norm of the code in the loss
    topk: int = ranged(8, ge=1)  # sparsity=topk: entries of the code kept (the rest set to 0)


def topk_code(h: Tensor, k: int) -> Tensor:
    """Keep the k largest entries of each code, zero the rest (k-sparse AE, Makhzani & Frey 2014)."""
    vals, idx = h.topk(k, dim=1)
    return torch.zeros_like(h).scatter(1, idx, vals)


@register_family("ae", AEConfig, "Autoencoders: plain, denoising, sparse (no likelihood)")
class Autoencoder(GenerativeModel):
    """Deterministic autoencoder x -> h -> x_hat trained on reconstruction error."""

    predictions = frozenset({"encode", "reconstruct"})
    data_kinds = frozenset({"image"})
    monitor = "val/loss"

    def __init__(self, cfg: AEConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        if cfg.sparsity == "topk" and cfg.topk > cfg.code_dim:
            raise ConfigError(f"model.topk={cfg.topk} exceeds model.code_dim={cfg.code_dim}; lower topk")
        c, h, w = data.shape
        if cfg.net == "linear":
            self.encoder: nn.Module = MLP(data.dims, [], cfg.code_dim)
            self.decoder: nn.Module = MLP(cfg.code_dim, [], data.dims)
        elif cfg.net == "mlp":
            self.encoder = MLP(data.dims, cfg.hidden, cfg.code_dim)
            self.decoder = MLP(cfg.code_dim, list(reversed(cfg.hidden)), data.dims)
        else:
            self.encoder = ConvEncoder(c, (h, w), cfg.hidden, cfg.code_dim)
            self.decoder = ConvDecoder(cfg.code_dim, c, (h, w), cfg.hidden)

    def _code(self, x01: Tensor) -> Tensor:
        h = self.encoder(x01)
        return topk_code(h, self.cfg.topk) if self.cfg.sparsity == "topk" else h

    def _decode(self, h: Tensor) -> Tensor:
        """Decoder output shaped like the images: [0,1] pixel predictions (mse) or logits (bce)."""
        return self.decoder(h).view(len(h), *self.data_spec.shape)

    def _corrupt(self, x01: Tensor) -> Tensor:
        if self.cfg.denoise == "gaussian":
            return x01 + self.cfg.noise_std * torch.randn_like(x01)
        if self.cfg.denoise == "mask":
            return x01 * (torch.rand_like(x01) >= self.cfg.mask_prob)
        return x01

    def reconstruction_error(self, out: Tensor, x01: Tensor) -> Tensor:
        """Per-example error summed over pixels [B]: squared error, or cross-entropy to the grey levels."""
        if self.cfg.recon == "mse":
            err = (out - x01) ** 2
        else:
            err = F.binary_cross_entropy_with_logits(out, x01, reduction="none")
        return err.flatten(1).sum(1)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x01 = batch["x"].float() / 255
        inp = self._corrupt(x01) if self.training else x01
        h = self._code(inp)
        recon = self.reconstruction_error(self._decode(h), x01).mean()
        loss = recon
        logs = {"recon": recon.detach(), "code_active": (h != 0).float().mean().detach()}
        if self.cfg.sparsity == "l1":
            l1 = h.abs().sum(1).mean()
            loss = loss + self.cfg.l1_weight * l1
            logs["code_l1"] = l1.detach()
        return loss, logs

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The code h of the clean input (after top-k for k-sparse models): [B, code_dim]."""
        return self._code(x.float() / 255)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        out = self._decode(self.encode(x))
        m = torch.sigmoid(out) if self.cfg.recon == "bce" else out.clamp(0, 1)
        return (m * 255).round().to(torch.uint8)
