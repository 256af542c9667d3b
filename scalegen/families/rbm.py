"""Restricted Boltzmann machines (Smolensky 1986; Hinton 2002): Bernoulli-Bernoulli, or Gaussian-Bernoulli
for real-valued data, trained by contrastive divergence (CD-k) or persistent CD (Tieleman 2008), with the
test log-likelihood estimated by annealed importance sampling (Salakhutdinov & Murray 2008).

The parameters live in `scalegen.nets.rbm`, the free energy, Gibbs sampler, CD loss and AIS in
`scalegen.objectives.rbm`. Persistent chains are per-rank state (`rank_state`), saved with every
checkpoint by the runtime. `nll` is F(v) + log Z with log Z from AIS (cached per set of weights), so it
is an estimate, not a bound: `nll_kind = "ais"`; `log_z_estimate` holds log Z and its standard error over
the AIS runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from scalegen.config.schema import ModelConfig, OptimConfig, choice, ranged
from scalegen.dataspec import DataSpec
from scalegen.errors import ConfigError
from scalegen.families.base import GenerativeModel
from scalegen.nets.rbm import RBMParams
from scalegen.objectives.rbm import (
    ais_log_z,
    base_rate_biases,
    cd_loss,
    free_energy,
    gibbs,
    parallel_tempering,
    sample_hidden,
    sample_visible,
)
from scalegen.registry import register_family


@dataclass
class RBMConfig(ModelConfig):
    family: str = "rbm"
    visible: str = choice("bernoulli", "gaussian")  # binary pixels, or unit-variance Gaussian on x / gaussian_std
    hidden: int = ranged(500, ge=1)  # hidden units (Salakhutdinov & Murray 2008: 500 on MNIST)
    cd_k: int = ranged(1, ge=1)  # Gibbs sweeps per negative sample (CD-k; S&M 2008 Table 2 up to CD-25)
    persistent: bool = False  # persistent CD: negatives continue chains kept across steps (per rank)
    pcd_chains: int = ranged(100, ge=1)  # persistent chains per rank
    pt_temperatures: int = ranged(1, ge=1)  # >1: persistent chains by parallel tempering over this many
    # inverse temperatures, linear from 1 down to pt_min_beta (Desjardins et al. 2010; bernoulli only)
    pt_min_beta: float = ranged(0.5, gt=0, lt=1)  # the hottest chain's inverse temperature
    init_std: float = ranged(0.01, gt=0)  # W ~ N(0, init_std^2) (Hinton 2010, practical guide sec. 8)
    binarize: str = choice("dynamic", "static", "threshold")  # bernoulli training data: resample each step,
    # fixed per image (stochastic binarization once, as S&M 2008), or x > 127
    gaussian_std: float = ranged(0.3, gt=0)  # gaussian visibles: v = (x / 255) / gaussian_std
    sample_steps: int = ranged(1000, ge=1)  # Gibbs sweeps from random visibles for `sample`
    ais_temperatures: int = ranged(1000, ge=1)  # intermediate distributions (S&M 2008 use 14,500)
    ais_runs: int = ranged(100, ge=2)  # independent AIS runs; log Z's standard error is over these
    ais_seed: int = ranged(0, ge=0)  # AIS is a fixed function of the weights given this seed
    ais_precision: str = choice("float64", "float32")  # chains' arithmetic (weights accumulate in float64)


def _static_uniform(x: Tensor) -> Tensor:
    """Uniform(0,1) noise that is a fixed function of each image's content, for static binarization (the same
    hash as the VAE's, so both families see the same binarized test set)."""
    flat = x.flatten(1).long()
    weights = torch.arange(1, flat.shape[1] + 1, device=x.device)
    content = (flat * weights).sum(1, keepdim=True) * 2654435761
    h = (content + weights * 40503) & 0xFFFFFFFF
    for _ in range(3):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return (h.float() / 2**32).view_as(flat)


@register_family("rbm", RBMConfig, "Restricted Boltzmann machine (CD-k / PCD, AIS log-likelihood)")
class RBM(GenerativeModel):
    """RBM on flattened images; nll = F(v) + log Z_AIS in nats."""

    predictions = frozenset({"nll", "sample", "encode", "reconstruct", "energy"})
    data_kinds = frozenset({"image"})
    nll_kind = "ais"
    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(self, cfg: RBMConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        self.gaussian = cfg.visible == "gaussian"
        if cfg.pt_temperatures > 1 and (self.gaussian or not cfg.persistent):
            raise ConfigError("model.pt_temperatures > 1 (parallel tempering) needs model.persistent=true and "
                              "model.visible=bernoulli")
        self.rbm = RBMParams(data.dims, cfg.hidden, cfg.init_std)
        # Training-data pixel marginals (count-weighted running sum) for AIS's base-rate model.
        self.register_buffer("data_sum", torch.zeros(data.dims, dtype=torch.float64))
        self.register_buffer("data_count", torch.zeros((), dtype=torch.float64))
        self.chains: Tensor | None = None  # persistent chains (this rank's)
        self._log_z: tuple[tuple, dict] | None = None  # (weights fingerprint, AIS result)

    # ---- data <-> visible units -----------------------------------------------------------------
    def visible(self, x: Tensor, mode: str) -> Tensor:
        """Visible vectors [B, D]: binarized ('dynamic' / 'static' / 'threshold' / 'mean' = x/255) or
        Gaussian (x/255/std; 'dequantize' adds uniform noise within each grey level's bin)."""
        levels = self.data_spec.levels
        k = torch.round(x.flatten(1).float() * (levels - 1) / 255)  # level index
        if self.gaussian:
            u = torch.rand_like(k) if mode == "dequantize" else 0.5
            return (k + u) / (levels - 1) / self.cfg.gaussian_std
        p = k / (levels - 1)
        if mode == "mean":
            return p
        if mode == "dynamic":
            return torch.bernoulli(p)
        if mode == "static":
            return (_static_uniform(x) < p).float()
        return (p > 0.5).float()

    def to_images(self, v: Tensor) -> Tensor:
        p = v * self.cfg.gaussian_std if self.gaussian else v
        return (p.clamp(0, 1) * 255).round().to(torch.uint8).view(len(v), *self.data_spec.shape)

    def random_visible(self, n: int) -> Tensor:
        if self.gaussian:
            return torch.randn(n, self.data_spec.dims, device=self.device) + self.rbm.b.detach()
        return torch.bernoulli(torch.full((n, self.data_spec.dims), 0.5, device=self.device))

    # ---- training -------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        v = self.visible(batch["x"], self.cfg.binarize if self.training else "static")
        if self.training:
            with torch.no_grad():
                self.data_sum += v.sum(0).double()
                self.data_count += len(v)
        pt = self.cfg.pt_temperatures
        if self.cfg.persistent:
            if self.chains is None or self.chains.shape[-1] != v.shape[1]:
                self.chains = self.random_visible(pt * self.cfg.pcd_chains)
                if pt > 1:
                    self.chains = self.chains.view(pt, self.cfg.pcd_chains, -1)
            start = self.chains.to(v.device)
        else:
            start = v
        if pt > 1:
            betas = torch.linspace(1.0, self.cfg.pt_min_beta, pt)
            chains = parallel_tempering(self.rbm, start, betas, self.cfg.cd_k)
            neg = chains[0]
        else:
            chains = neg = gibbs(self.rbm, start, self.cfg.cd_k, self.gaussian)[0]
        if self.cfg.persistent and self.training:
            self.chains = chains.detach()
        loss = cd_loss(self.rbm, v, neg, self.gaussian)
        return loss, {"free_energy_data": free_energy(self.rbm, v, self.gaussian).mean().detach()}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """val/loss: one-step reconstruction error (cross-entropy in nats per image for binary visibles, half
        squared error for Gaussian), a cheap monitor; the AIS log-likelihood is `scalegen eval`'s bpd."""
        v = self.visible(batch["x"], "static")
        p_h, _ = sample_hidden(self.rbm, v)
        mean, _ = sample_visible(self.rbm, p_h, self.gaussian)
        if self.gaussian:
            recon = 0.5 * ((mean - v) ** 2).sum(1)
        else:
            recon = F.binary_cross_entropy(mean.clamp(1e-6, 1 - 1e-6), v, reduction="none").sum(1)
        n = len(v)
        self.log("val/loss", recon.mean(), prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/free_energy", free_energy(self.rbm, v, self.gaussian).mean(), sync_dist=True, batch_size=n)

    # ---- per-rank state (persistent chains) -------------------------------------------------------
    def rank_state(self) -> dict[str, Any]:
        return {} if self.chains is None else {"chains": self.chains.detach().cpu()}

    def load_rank_state(self, state: dict[str, Any], saved_world_size: int, world_size: int) -> None:
        super().load_rank_state(state, saved_world_size, world_size)  # refuses another world size
        chains = state.get("chains")
        self.chains = None if chains is None else chains.to(self.device)

    # ---- likelihood -------------------------------------------------------------------------------
    def base_rate(self) -> Tensor:
        if float(self.data_count) == 0:
            raise ConfigError("the RBM has seen no training data: AIS's base-rate model needs the training "
                              "pixel marginals (train it first)")
        mean = (self.data_sum / self.data_count).float()
        return base_rate_biases(mean, float(self.data_count), self.gaussian)

    def log_z_estimate(self) -> dict[str, float]:
        """AIS log Z (cached while the weights are unchanged): {log_z, log_z_stderr, ais_runs, ...}."""
        fingerprint = tuple(float(p.detach().double().sum()) for p in self.rbm.parameters()) + (
            float(self.rbm.W.detach().double().square().sum()),)
        if self._log_z is None or self._log_z[0] != fingerprint:
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.ais_seed)
            dtype = torch.float32 if self.cfg.ais_precision == "float32" else torch.float64
            result = ais_log_z(self.rbm, self.base_rate(), self.cfg.ais_temperatures, self.cfg.ais_runs,
                               self.gaussian, gen, dtype)
            self._log_z = (fingerprint, result.as_dict())
        return dict(self._log_z[1])

    @torch.no_grad()
    def energy(self, x: Tensor) -> Tensor:
        """Free energy F(v) of the (statically binarized) image: -log p(x) up to log Z."""
        return free_energy(self.rbm, self.visible(x, "static"),
                           self.gaussian)

    @torch.no_grad()
    def nll(self, x: Tensor, y: Tensor | None = None, k: int | None = None) -> Tensor:
        """-log p(x) = F(v) + log Z (AIS) in nats per image. Bernoulli: of the statically binarized image.
        Gaussian: of the grey levels, with uniform dequantization (an upper bound in expectation) and the
        bin width's Jacobian, -D log(1 / ((levels - 1) std))."""
        log_z = self.log_z_estimate()["log_z"]
        if not self.gaussian:
            return free_energy(self.rbm, self.visible(x, "static"), False).double().add(log_z).float()
        v = self.visible(x, "dequantize")
        bin_width = 1.0 / ((self.data_spec.levels - 1) * self.cfg.gaussian_std)
        nats = free_energy(self.rbm, v, True).double() + log_z - self.data_spec.dims * math.log(bin_width)
        return nats.float()

    # ---- sampling and features ---------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        """E[v|h] after `sample_steps` Gibbs sweeps from random visibles, as images."""
        _, mean = gibbs(self.rbm, self.random_visible(n), self.cfg.sample_steps, self.gaussian)
        return self.to_images(mean)

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Hidden probabilities p(h=1|v) with v = the pixel intensities (mean-field input)."""
        return sample_hidden(self.rbm, self.visible(x, "mean"))[0]

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        p_h, _ = sample_hidden(self.rbm, self.visible(x, "mean"))
        return self.to_images(sample_visible(self.rbm, p_h, self.gaussian)[0])
