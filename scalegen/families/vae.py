"""Variational autoencoders: Gaussian latent, MLP or conv networks, Bernoulli / discretized logistic /
discretized Gaussian likelihoods; beta-VAE, conditional VAE and the IWAE bound by configuration."""

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
from scalegen.objectives.elbo import (
    bernoulli_log_prob,
    discretized_log_prob,
    gaussian_kl,
    iwae_bound,
    log_normal,
)
from scalegen.registry import register_family


@dataclass
class VAEConfig(ModelConfig):
    family: str = "vae"
    net: str = choice("mlp", "conv")  # encoder/decoder architecture
    hidden: list[int] = ranged(ge=1, default_factory=lambda: [512, 256])  # MLP widths, or conv channels per stride 2
    latent_dim: int = ranged(16, ge=1)  # dimension of the Gaussian latent z
    likelihood: str = choice("bernoulli", "logistic", "gaussian")  # p(x|z); logistic/gaussian are discretized to 8 bits
    binarize: str = choice("dynamic", "static", "threshold")  # bernoulli: how pixels become {0,1} in training
    beta: float = ranged(1.0, ge=0)  # weight of the KL term (beta-VAE, Higgins et al. 2017); 1 = the ELBO
    kl_warmup_steps: int = ranged(0, ge=0)  # ramp the KL weight linearly from 0 to beta over this many steps
    conditional: bool = False  # condition encoder, decoder and prior on the label (Sohn et al. 2015)
    iwae_k: int = ranged(1, ge=1)  # importance samples in training: 1 = ELBO, >1 = IWAE (Burda et al. 2016)
    min_log_scale: float = ranged(-7.0)  # floor of the decoder's per-pixel log-scale (logistic/gaussian)


def _static_uniform(x: Tensor) -> Tensor:
    """Uniform(0,1) noise that is a fixed function of each image's content (static binarization).

    A vectorized integer hash of (image content, pixel index): the same image always gets the same noise,
    on any device and in any batch."""
    flat = x.flatten(1).long()
    weights = torch.arange(1, flat.shape[1] + 1, device=x.device)
    content = (flat * weights).sum(1, keepdim=True) * 2654435761
    h = (content + weights * 40503) & 0xFFFFFFFF
    for _ in range(3):  # xorshift-multiply rounds to decorrelate neighbouring pixels
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return (h.float() / 2**32).view_as(x)


@register_family("vae", VAEConfig, "Variational autoencoder (beta, conditional, IWAE)")
class VAE(GenerativeModel):
    """Variational autoencoder with a Gaussian latent (Kingma & Welling 2014)."""

    predictions = frozenset({"nll", "sample", "encode", "reconstruct"})
    nll_kind = "elbo"  # nll(x, k=1) is the negative ELBO; nll(x, k>1) the IWAE-k bound

    def __init__(self, cfg: VAEConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        if data.kind != "image":
            raise ConfigError(f"the vae family models images; data {data.kind!r} is not supported")
        if cfg.iwae_k > 1 and cfg.beta != 1.0:
            raise ConfigError("model.beta applies to the ELBO only: set model.iwae_k=1 or model.beta=1")
        c, h, w = data.shape
        cond = data.num_classes if cfg.conditional else 0
        out_per_pixel = 1 if cfg.likelihood == "bernoulli" else 2
        if cfg.net == "mlp":
            self.encoder = MLP(data.dims + cond, cfg.hidden, 2 * cfg.latent_dim)
            self.decoder = MLP(cfg.latent_dim + cond, list(reversed(cfg.hidden)), out_per_pixel * data.dims)
        else:
            self.encoder = ConvEncoder(c, h, cfg.hidden, 2 * cfg.latent_dim, extra_dim=cond)
            self.decoder = ConvDecoder(cfg.latent_dim + cond, out_per_pixel * c, h, cfg.hidden)
        # Conditional prior p(z|y) = N(mu_y, diag e^logvar_y); unconditional prior is N(0, I).
        self.prior = nn.Embedding(data.num_classes, 2 * cfg.latent_dim) if cfg.conditional else None
        if self.prior is not None:
            nn.init.zeros_(self.prior.weight)

    # ---- pieces ---------------------------------------------------------------------------------
    def _onehot(self, y: Tensor | None, n: int) -> Tensor | None:
        if not self.cfg.conditional:
            return None
        if y is None or (y < 0).any():
            raise ConfigError("model.conditional=true needs a label for every example (data without labels: "
                              "set model.conditional=false)")
        return F.one_hot(y, self.data_spec.num_classes).float()

    def _posterior(self, x01: Tensor, y1h: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.cfg.net == "mlp":
            inp = x01.flatten(1) if y1h is None else torch.cat([x01.flatten(1), y1h], 1)
            out = self.encoder(inp)
        else:
            out = self.encoder(x01, y1h)
        mu, logvar = out.chunk(2, 1)
        return mu, logvar

    def _prior(self, y1h: Tensor | None, n: int) -> tuple[Tensor | float, Tensor | float]:
        if self.prior is None:
            return 0.0, 0.0
        mu, logvar = (y1h @ self.prior.weight).chunk(2, 1)
        return mu, logvar

    def _decode(self, z: Tensor, y1h: Tensor | None) -> Tensor:
        inp = z if y1h is None else torch.cat([z, y1h], -1)
        return self.decoder(inp).view(len(z), -1, *self.data_spec.shape)

    def _targets(self, x: Tensor, train: bool) -> tuple[Tensor, Tensor]:
        """(encoder input in [0,1], likelihood target): binarized for bernoulli, raw uint8 otherwise."""
        if self.cfg.likelihood != "bernoulli":
            return x.float() / 255, x
        p = x.float() / 255
        mode = self.cfg.binarize if train else ("threshold" if self.cfg.binarize == "threshold" else "static")
        if mode == "dynamic":
            xb = (torch.rand_like(p) < p).float()
        elif mode == "static":
            xb = (_static_uniform(x) < p).float()
        else:
            xb = (p > 0.5).float()
        return xb, xb

    def _log_px_z(self, target: Tensor, out: Tensor) -> Tensor:
        if self.cfg.likelihood == "bernoulli":
            return bernoulli_log_prob(target, out[:, 0])
        mean, log_scale = out[:, 0], out[:, 1].clamp(min=self.cfg.min_log_scale)
        return discretized_log_prob(target, mean, log_scale, self.cfg.likelihood)

    def _mean_image(self, out: Tensor) -> Tensor:
        if self.cfg.likelihood == "bernoulli":
            m = torch.sigmoid(out[:, 0])
        else:
            m = (out[:, 0].clamp(-1, 1) + 1) / 2
        return (m * 255).round().clamp(0, 255).to(torch.uint8)

    def log_weights(self, x: Tensor, y: Tensor | None, k: int, train: bool = False) -> Tensor:
        """log p(x, z_k) - log q(z_k | x) for k samples z_k ~ q: shape [k, B]."""
        inp, target = self._targets(x, train)
        y1h = self._onehot(y, len(x))
        mu, logvar = self._posterior(inp, y1h)
        pmu, plogvar = self._prior(y1h, len(x))
        z = mu + torch.randn(k, *mu.shape, device=mu.device, dtype=mu.dtype) * (0.5 * logvar).exp()
        flat_z = z.reshape(k * len(x), -1)
        rep = lambda t: None if t is None else t.repeat(k, *([1] * (t.dim() - 1)))
        out = self._decode(flat_z, rep(y1h))
        log_px = self._log_px_z(rep(target), out).view(k, len(x))
        return log_px + log_normal(z, pmu, plogvar) - log_normal(z, mu, logvar)

    # ---- the family contract --------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch["x"], batch.get("y")
        if self.cfg.iwae_k > 1:
            bound = iwae_bound(self.log_weights(x, y, self.cfg.iwae_k, train=self.training))
            loss = -bound.mean()
            return loss, {"iwae_nats": loss.detach()}
        inp, target = self._targets(x, self.training)
        y1h = self._onehot(y, len(x))
        mu, logvar = self._posterior(inp, y1h)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = -self._log_px_z(target, self._decode(z, y1h))
        pmu, plogvar = self._prior(y1h, len(x))
        kl = gaussian_kl(mu, logvar, pmu, plogvar)
        warm = min(1.0, self.global_step / self.cfg.kl_warmup_steps) if self.cfg.kl_warmup_steps else 1.0
        beta = self.cfg.beta * warm
        loss = (recon + beta * kl).mean()
        return loss, {"recon_nats": recon.mean().detach(), "kl_nats": kl.mean().detach(),
                      "neg_elbo_nats": (recon + kl).mean().detach(), "beta": torch.tensor(beta)}

    def nll(self, x: Tensor, y: Tensor | None = None, k: int | None = None, chunk: int = 100) -> Tensor:
        """Negative ELBO (k=1, the default) or negative IWAE-k bound (k>1) of the discrete data, nats per example."""
        k = 1 if k is None else k
        if k == 1:
            return -self.log_weights(x, y, 1)[0]
        parts = [self.log_weights(x, y, min(chunk, k - i)) for i in range(0, k, chunk)]
        return -iwae_bound(torch.cat(parts, 0))

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        """Decoder means for z from the prior (as is conventional for VAE samples), uint8 images."""
        if self.cfg.conditional and y is None:
            y = torch.arange(n, device=self.device) % self.data_spec.num_classes
        y1h = self._onehot(y, n)
        pmu, plogvar = self._prior(y1h, n)
        eps = torch.randn(n, self.cfg.latent_dim, device=self.device)
        z = pmu + eps * torch.exp(0.5 * torch.as_tensor(plogvar, device=self.device))
        return self._mean_image(self._decode(z, y1h))

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Posterior means E[z|x] (the encoder is label-free unless the model is conditional)."""
        inp, _ = self._targets(x, train=False)
        return self._posterior(inp, self._onehot(y, len(x)))[0]

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        inp, _ = self._targets(x, train=False)
        y1h = self._onehot(y, len(x))
        return self._mean_image(self._decode(self._posterior(inp, y1h)[0], y1h))

    @torch.no_grad()
    def decode_latent(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """uint8 decoder-mean images of latents z [B, latent_dim] (M1+M2 decodes its z1 with this)."""
        return self._mean_image(self._decode(z, self._onehot(y, len(z))))
