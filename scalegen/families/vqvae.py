"""VQ-VAE (van den Oord et al. 2017): encoder, a codebook of K vectors, decoder.

    z_e = enc(x),  k = argmin_j ||z_e - e_j||,  z_q = e_k,  x ~ p(x | z_q) = dec(z_q)
    loss = -log p(x | z_q) + ||sg(z_e) - z_q||^2 + beta ||z_e - sg(z_q)||^2          (2017 Eq. 3)

with straight-through gradients from the decoder to the encoder. With `codebook: ema` the middle term
is dropped and the codebook follows exponential moving averages of its assigned encoder outputs
(Appendix A.1). Dead codes (running assignment count below `dead_code_threshold`) are restarted from
encoder outputs of the current batch every `restart_every` steps, and with `init_from_data` every code
starts at an encoder output of the first training batch (the same restart, applied to all). Squared
distances are summed over the latent map and its channels, like the reconstruction term over pixels.

Likelihood. The posterior q(z|x) is a point mass on the nearest codes and the prior p(z) is uniform over
K^n code maps (n positions), so KL(q || p) = n log K and

    -log p(x) <= -log p(x | z_q) + n log K        (the first stage's bound; `nll_kind = "bound"`).

A PixelCNN prior trained over the codes (the `vqvae_prior` family) replaces n log K by -log p(z_q).
The decoder's p(x | z_q) is a discretized logistic or Gaussian over the 256 levels (as in the vae
family), so the bound is in nats of the 8-bit data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from scalegen.config.schema import ModelConfig, OptimConfig, choice, ranged
from scalegen.dataspec import DataSpec, images_to_unit
from scalegen.errors import ConfigError
from scalegen.families.base import GenerativeModel
from scalegen.nets.vq import VectorQuantizer, VQDecoder, VQEncoder, assignment_statistics, perplexity, straight_through
from scalegen.objectives.elbo import discretized_log_prob
from scalegen.registry import register_family


@dataclass
class VQVAEConfig(ModelConfig):
    family: str = "vqvae"
    hidden: list[int] = ranged(None, ge=1, default_factory=lambda: [64, 128])  # channels per stride-2 stage
    res_blocks: int = ranged(2, ge=0)  # residual blocks after the encoder's / before the decoder's stages
    code_dim: int = ranged(64, ge=1)  # D, size of each codebook vector
    num_codes: int = ranged(512, ge=2)  # K, codebook size
    beta: float = ranged(0.25, ge=0)  # commitment weight (2017 Sec. 3.2: 0.25)
    codebook: str = choice("ema", "loss")  # codebook learned by EMA (Appendix A.1) or by the codebook loss
    ema_decay: float = ranged(0.99, ge=0, lt=1)  # EMA decay of the codebook statistics (and of the usage)
    ema_eps: float = ranged(1e-5, ge=0)  # Laplace smoothing of the EMA counts
    dead_code_threshold: float = ranged(1.0, ge=0)  # a code is dead below this running count of assignments
    # per step (all ranks; Dhariwal et al. 2020 use 1)
    restart_every: int = ranged(10, ge=0)  # restart dead codes every N training steps (0 = never)
    init_from_data: bool = True  # start every code at an encoder output of the first training batch
    likelihood: str = choice("logistic", "gaussian")  # p(x|z_q): discretized over the 256 levels
    min_log_scale: float = ranged(-7.0, le=0)  # floor of the decoder's per-pixel log-scale


@register_family("vqvae", VQVAEConfig, "VQ-VAE: discrete latent codes, bound with a uniform prior")
class VQVAE(GenerativeModel):
    """VQ-VAE first stage: encoder, vector quantizer, decoder."""

    predictions = frozenset({"nll", "encode", "reconstruct"})
    nll_kind = "bound"
    monitor = "val/loss"

    def __init__(self, cfg: VQVAEConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        if data.kind != "image" or len(data.shape) != 3:
            raise ConfigError(f"the vqvae family models images [C, H, W], not {data.kind} {data.shape}")
        c, h, w = data.shape
        self.encoder = VQEncoder(c, cfg.hidden, cfg.res_blocks, cfg.code_dim)
        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.code_dim, cfg.codebook == "ema", cfg.ema_decay,
                                         cfg.ema_eps)
        self.decoder = VQDecoder(cfg.code_dim, cfg.hidden, cfg.res_blocks, 2 * c, (h, w))

    # ---- pieces (also what the prior family uses) --------------------------------------------
    def encode_codes(self, x: Tensor) -> Tensor:
        """Code map [B, h, w] (int64) of uint8 images."""
        return self.quantizer.quantize(self.encoder(images_to_unit(x)))[0]

    def decoder_out(self, z_q: Tensor) -> Tensor:
        """[B, 2, C, H, W]: per-pixel mean and log-scale of p(x | z_q)."""
        out = self.decoder(z_q)
        return out.view(len(out), 2, *self.data_spec.shape)

    def recon_nll(self, x: Tensor, z_q: Tensor) -> Tensor:
        """-log p(x | z_q) in nats of the 8-bit data, per example [B]."""
        out = self.decoder_out(z_q)
        log_scale = out[:, 1].clamp(min=self.cfg.min_log_scale)
        return -discretized_log_prob(x, out[:, 0], log_scale, self.cfg.likelihood)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """uint8 images (decoder means) of code maps [B, h, w]."""
        m = (self.decoder_out(self.quantizer.lookup(codes))[:, 0].clamp(-1, 1) + 1) / 2
        return (m * 255).round().to(torch.uint8)

    # ---- codebook maintenance (collectives here, never in the net) ----------------------------
    @staticmethod
    def _all_reduce(t: Tensor) -> Tensor:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return t

    @torch.no_grad()
    def _update_codebook(self, z_e: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
        """EMA / usage update from every rank's assignments; dead-code restarts. Returns (counts, dead)."""
        q = self.quantizer
        flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, q.dim).float()
        counts, sums = assignment_statistics(flat, codes.reshape(-1), q.num_codes)
        counts, sums = self._all_reduce(counts), self._all_reduce(sums)
        if q.ema:
            q.ema_update(counts, sums)
        else:
            q.track_usage(counts)
        dead = q.dead_codes(self.cfg.dead_code_threshold)
        every = self.cfg.restart_every
        first = self.cfg.init_from_data and not q.is_initialized()
        if first:
            dead = torch.ones_like(dead)
        # Decided on the host from the step alone; which codes restart stays on the device (a candidate
        # drawn for every code, kept where the code is dead), so no count is read into Python.
        if first or (every and self.global_step % every == 0):
            candidates = flat[torch.randint(len(flat), (q.num_codes,), device=flat.device)].contiguous()
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(candidates, 0)  # the same restart vectors on every rank
            q.restart(dead, candidates)
        return counts, dead

    # ---- the family contract --------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch["x"]
        z_e = self.encoder(images_to_unit(x))
        codes, z_q = self.quantizer.quantize(z_e)
        recon = self.recon_nll(x, straight_through(z_e, z_q))
        sq = lambda t: t.flatten(1).pow(2).sum(1)  # noqa: E731
        commitment = sq(z_e - z_q.detach())
        loss = recon + self.cfg.beta * commitment
        logs = {"recon_nats": recon.mean().detach(), "commitment": commitment.mean().detach()}
        if not self.quantizer.ema:
            codebook_loss = sq(z_e.detach() - z_q)
            loss = loss + codebook_loss
            logs["codebook_loss"] = codebook_loss.mean().detach()
        if self.training:
            counts, dead = self._update_codebook(z_e, codes)
            logs["dead_codes"] = dead.float().sum()
        else:
            counts = torch.bincount(codes.reshape(-1), minlength=self.quantizer.num_codes).float()
        logs["perplexity"] = perplexity(counts)
        logs["code_usage"] = (counts > 0).float().mean()  # fraction of the K codes used by this batch
        return loss.mean(), logs

    def nll(self, x: Tensor, y: Tensor | None = None, k: int | None = None) -> Tensor:
        """-log p(x | z_q) + n log K: an upper bound on -log p(x) under the uniform prior, nats [B]."""
        z_q = self.quantizer.quantize(self.encoder(images_to_unit(x)))[1]
        n = z_q.shape[-1] * z_q.shape[-2]
        return self.recon_nll(x, z_q) + n * math.log(self.cfg.num_codes)

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The quantized map z_q flattened: [B, D h w]."""
        return self.quantizer.quantize(self.encoder(images_to_unit(x)))[1].flatten(1)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.decode_codes(self.encode_codes(x))
