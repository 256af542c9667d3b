"""RBM mathematics: free energies, Gibbs sampling, contrastive divergence, and log Z by annealed importance
sampling (Salakhutdinov & Murray 2008) or, for tiny models, by exact enumeration.

Visible units are Bernoulli (v in {0,1}^V) or Gaussian with unit variance (Gaussian-Bernoulli RBM,
E(v, h) = ||v - b||^2 / 2 - v.W h - c.h); hidden units are Bernoulli.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from scalegen.nets.rbm import RBMParams


def free_energy(rbm: RBMParams, v: Tensor, gaussian: bool = False) -> Tensor:
    """F(v) = -log sum_h exp(-E(v, h)), so p(v) = exp(-F(v)) / Z; shape [B]."""
    hidden = F.softplus(rbm.hidden_logits(v)).sum(1)
    if gaussian:
        return 0.5 * ((v - rbm.b) ** 2).sum(1) - hidden
    return -(v @ rbm.b) - hidden


def sample_hidden(rbm: RBMParams, v: Tensor) -> tuple[Tensor, Tensor]:
    """(p(h=1|v), a sample h ~ p(h|v))."""
    p = torch.sigmoid(rbm.hidden_logits(v))
    return p, torch.bernoulli(p)


def sample_visible(rbm: RBMParams, h: Tensor, gaussian: bool = False) -> tuple[Tensor, Tensor]:
    """(E[v|h], a sample v ~ p(v|h))."""
    logits = rbm.visible_logits(h)
    if gaussian:
        return logits, logits + torch.randn_like(logits)
    p = torch.sigmoid(logits)
    return p, torch.bernoulli(p)


@torch.no_grad()
def gibbs(rbm: RBMParams, v: Tensor, steps: int, gaussian: bool = False) -> tuple[Tensor, Tensor]:
    """`steps` block-Gibbs sweeps v -> h -> v from v; returns (the last v sample, its mean E[v|h])."""
    mean = v
    for _ in range(steps):
        _, h = sample_hidden(rbm, v)
        mean, v = sample_visible(rbm, h, gaussian)
    return v, mean


def cd_loss(rbm: RBMParams, v_data: Tensor, v_model: Tensor, gaussian: bool = False) -> Tensor:
    """mean F(v_data) - mean F(v_model) with v_model a fixed (detached) sample: its gradient is the CD
    (or, with persistent chains, PCD) estimate of -d/dtheta mean log p(v_data), since d log Z/dtheta
    = -E_model[dF/dtheta]."""
    return free_energy(rbm, v_data, gaussian).mean() - free_energy(rbm, v_model.detach(), gaussian).mean()


def exact_log_z(rbm: RBMParams, gaussian: bool = False) -> Tensor:
    """log Z by enumerating the 2^H hidden configurations (differentiable; tiny models only):
    Bernoulli: log Z = logsumexp_h [c.h + sum_i softplus(b_i + (W h)_i)];
    Gaussian: log Z = logsumexp_h [c.h + (||b + W h||^2 - ||b||^2) / 2] + (V / 2) log 2 pi."""
    hidden = rbm.c.numel()
    if hidden > 20:
        raise ValueError(f"exact log Z enumerates 2^{hidden} hidden states; use AIS for more than 20 hidden units")
    codes = torch.arange(2**hidden, device=rbm.W.device)
    h = ((codes[:, None] >> torch.arange(hidden, device=codes.device)) & 1).to(rbm.W.dtype)
    act = h @ rbm.W.t() + rbm.b  # [2^H, V]
    if gaussian:
        v = rbm.b.numel()
        terms = h @ rbm.c + 0.5 * ((act**2).sum(1) - (rbm.b**2).sum())
        return torch.logsumexp(terms, 0) + 0.5 * v * math.log(2 * math.pi)
    return torch.logsumexp(h @ rbm.c + F.softplus(act).sum(1), 0)


@dataclass
class AISResult:
    log_z: float  # log of the mean importance weight times Z_A: the AIS estimate of log Z
    stderr: float  # standard error of log_z over the runs (delta method: std(w) / (sqrt(n) mean(w)))
    runs: int
    temperatures: int
    log_weights: Tensor  # [runs]

    def as_dict(self) -> dict:
        return {"log_z": self.log_z, "log_z_stderr": self.stderr, "ais_runs": self.runs,
                "ais_temperatures": self.temperatures}


def base_rate_biases(mean: Tensor, count: float, gaussian: bool = False, smoothing: float = 0.05) -> Tensor:
    """Visible biases of the base-rate model from the training data's pixel means over `count` examples
    (Salakhutdinov & Murray 2008, sec. 4.2): the logit of the smoothed marginals (Bernoulli), or the data
    mean itself (Gaussian visibles of unit variance)."""
    if gaussian:
        return mean
    p = (mean * count + smoothing) / (count + 2 * smoothing)
    return torch.log(p) - torch.log1p(-p)


@torch.no_grad()
def ais_log_z(rbm: RBMParams, base_bias: Tensor, temperatures: int = 1000, runs: int = 100,
              gaussian: bool = False, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float64) -> AISResult:
    """log Z of `rbm` by AIS from the base-rate model A (weights 0, visible biases `base_bias`) along the
    geometric path p_k ∝ p_A^(1 - beta_k) p_B^beta_k, beta linear from 0 to 1 over `temperatures` steps,
    one Gibbs transition per step (Salakhutdinov & Murray 2008, sec. 4.1, eq. 13-15).

    `dtype` is the arithmetic of the chains (float32 halves the time of a large model); the importance
    weights always accumulate in float64."""
    W, b, c = rbm.W.to(dtype), rbm.b.to(dtype), rbm.c.to(dtype)
    bA = base_bias.to(W)
    V, H = W.shape
    betas = torch.linspace(0, 1, temperatures + 1, dtype=torch.float64).tolist()

    def rand(shape: tuple[int, ...]) -> Tensor:
        return torch.rand(shape, generator=generator, dtype=dtype, device=W.device)

    def randn(shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype, device=W.device)

    # Exact sample from the base model and its log partition function (its H hidden units contribute 2^H).
    if gaussian:
        v = bA + randn((runs, V))
        log_z_a = 0.5 * V * math.log(2 * math.pi) + H * math.log(2)
    else:
        v = (rand((runs, V)) < torch.sigmoid(bA)).to(dtype)
        log_z_a = F.softplus(bA.double()).sum().item() + H * math.log(2)
    log_w = torch.zeros(runs, dtype=torch.float64, device=W.device)
    for k in range(1, temperatures + 1):
        beta_prev, beta = betas[k - 1], betas[k]
        act = v @ W + c  # shared by the weight update and the transition
        # log p*_beta(v) - log p*_beta_prev(v), with A's hidden units marginalized (a constant 2^H):
        # Bernoulli log p*_beta(v) = (1 - beta) v.bA + beta v.b + sum_j softplus(beta act_j);
        # Gaussian: -(1 - beta) ||v - bA||^2 / 2 - beta ||v - b||^2 / 2 + the same softplus sum.
        act64 = act.double()
        hidden = (F.softplus(beta * act64) - F.softplus(beta_prev * act64)).sum(1)
        if gaussian:
            visible = -0.5 * (((v - b) ** 2).sum(1) - ((v - bA) ** 2).sum(1)).double()
        else:
            visible = (v @ (b - bA)).double()
        log_w += (beta - beta_prev) * visible + hidden
        if k == temperatures:
            break
        # One Gibbs transition that leaves p_beta invariant.
        h = (rand((runs, H)) < torch.sigmoid(beta * act)).to(dtype)
        if gaussian:
            v = (1 - beta) * bA + beta * (b + h @ W.t()) + randn((runs, V))
        else:
            v = (rand((runs, V)) < torch.sigmoid((1 - beta) * bA + beta * (b + h @ W.t()))).to(dtype)
    log_mean_w = torch.logsumexp(log_w, 0) - math.log(runs)
    rel = torch.exp(log_w - log_mean_w)  # w_i / mean(w)
    stderr = float(rel.std() / math.sqrt(runs)) if runs > 1 else float("nan")
    return AISResult(float(log_z_a + log_mean_w), stderr, runs, temperatures, log_w.float().cpu())


def tempered_free_energy(rbm: RBMParams, v: Tensor, beta: float | Tensor) -> Tensor:
    """Free energy of a Bernoulli RBM at inverse temperature beta (every parameter scaled by beta)."""
    return -beta * (v @ rbm.b) - F.softplus(beta * rbm.hidden_logits(v)).sum(-1)


@torch.no_grad()
def parallel_tempering(rbm: RBMParams, chains: Tensor, betas: Tensor, steps: int) -> Tensor:
    """Bernoulli RBM chains [K, N, V] at inverse temperatures betas [K] (betas[0] = 1, the model): `steps`
    Gibbs sweeps at each temperature, then one Metropolis swap attempt between each adjacent pair of
    temperatures (Desjardins et al. 2010), which leaves the product of the tempered distributions
    invariant. Returns the new chains; chains[0] are the model's negatives."""
    bt = betas.to(chains).view(-1, 1, 1)
    for _ in range(steps):
        h = torch.bernoulli(torch.sigmoid(bt * rbm.hidden_logits(chains)))
        chains = torch.bernoulli(torch.sigmoid(bt * rbm.visible_logits(h)))
    chains = chains.clone()
    for k in range(len(betas) - 1):
        vi, vj = chains[k], chains[k + 1]
        bi, bj = float(betas[k]), float(betas[k + 1])
        log_accept = (tempered_free_energy(rbm, vi, bi) + tempered_free_energy(rbm, vj, bj)
                      - tempered_free_energy(rbm, vj, bi) - tempered_free_energy(rbm, vi, bj))
        swap = (torch.rand_like(log_accept).log() < log_accept).unsqueeze(1)
        chains[k], chains[k + 1] = torch.where(swap, vj, vi), torch.where(swap, vi, vj)
    return chains
