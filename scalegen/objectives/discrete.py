"""Discrete latent variables: Bernoulli and categorical layers, their log-densities and KL to a uniform
prior, the score-function estimator with control variates (NVIL, Mnih & Gregor 2014) and the
Gumbel-softmax / Concrete relaxation (Jang et al. 2017; Maddison et al. 2017).

Shapes: Bernoulli logits [..., D], z in {0,1}^D; categorical logits [..., D, K], z one-hot [..., D, K].
Every log-density is summed over the latent dimensions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ---- densities --------------------------------------------------------------------------------
def sample_bernoulli(logits: Tensor) -> Tensor:
    return (torch.rand_like(logits) < torch.sigmoid(logits)).to(logits.dtype)


def bernoulli_log_q(z: Tensor, logits: Tensor) -> Tensor:
    z, logits = torch.broadcast_tensors(z, logits)
    return -F.binary_cross_entropy_with_logits(logits, z, reduction="none").sum(-1)


def sample_categorical(logits: Tensor) -> Tensor:
    idx = torch.distributions.Categorical(logits=logits).sample()
    # By comparison, not F.one_hot, whose range check reads the indices on the host in every call.
    return (idx.unsqueeze(-1) == torch.arange(logits.shape[-1], device=idx.device)).to(logits.dtype)


def categorical_log_q(z: Tensor, logits: Tensor) -> Tensor:
    return (z * F.log_softmax(logits, -1)).sum((-1, -2))


def kl_to_uniform(logits: Tensor, latent: str) -> Tensor:
    """KL(q || uniform prior) per example: Bernoulli(1/2) per bit, or uniform over K per variable."""
    if latent == "bernoulli":
        p = torch.sigmoid(logits)
        return (p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits) + math.log(2)).sum(-1)
    logp = F.log_softmax(logits, -1)
    return (logp.exp() * logp).sum((-1, -2)) + logits.shape[-2] * math.log(logits.shape[-1])


def uniform_log_prior(latent: str, dim: int, categories: int = 2) -> float:
    return -dim * math.log(2 if latent == "bernoulli" else categories)


def sample_latent(logits: Tensor, latent: str) -> tuple[Tensor, Tensor]:
    """An exact discrete sample z (no gradient) and log q(z|x) (differentiable in the logits)."""
    if latent == "bernoulli":
        z = sample_bernoulli(logits.detach())
        return z, bernoulli_log_q(z, logits)
    z = sample_categorical(logits.detach())
    return z, categorical_log_q(z, logits)


# ---- relaxations ------------------------------------------------------------------------------
def binary_concrete(logits: Tensor, tau: float, hard: bool = False) -> Tensor:
    """sigmoid((logit + logistic noise) / tau) (Maddison et al. 2017, eq. 21); hard: the rounded value in the
    forward pass and the relaxed gradient in the backward (straight-through)."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    y = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    return (y > 0.5).to(y.dtype) + y - y.detach() if hard else y


def gumbel_softmax(logits: Tensor, tau: float, hard: bool = False) -> Tensor:
    """softmax((logits + Gumbel noise) / tau) over the last dim (Jang et al. 2017, eq. 1); hard: one-hot of
    the argmax forward, the relaxed gradient backward (straight-through Gumbel-softmax)."""
    return F.gumbel_softmax(logits, tau=tau, hard=hard, dim=-1)


def temperature(step: int, start: float, minimum: float, decay: float) -> float:
    """tau = max(minimum, start * exp(-decay * step)) (the annealing of Jang et al. 2017, section 4)."""
    return max(minimum, start * math.exp(-decay * step))


# ---- the score-function estimator -------------------------------------------------------------
def score_function_surrogate(f: Tensor, log_q: Tensor, signal: Tensor) -> Tensor:
    """A per-example surrogate whose gradient is the score-function estimate of grad E_q[f]:
    d/dphi = signal * d log q / dphi + df/dphi, where `signal` is f minus a baseline (held constant)
    and f's own dependence (the -log q of the ELBO and the decoder) is kept. Maximize it."""
    return f + signal.detach() * log_q


class ControlVariates(nn.Module):
    """NVIL's learning-signal corrections (Mnih & Gregor 2014, section 3.3): l = f - b(x) (b: an
    input-dependent baseline, trained by regression); a moving average c of l subtracted; and the
    result divided by max(1, sqrt(v)), v a moving average of the variance of l - c. The division only
    rescales the encoder's gradient (an adaptive step size); centring leaves it unbiased."""

    def __init__(self, decay: float = 0.9, normalize: bool = True) -> None:
        super().__init__()
        self.decay, self.normalize = decay, normalize
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.ones(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, f: Tensor, baseline: Tensor | float = 0.0, update: bool = True) -> Tensor:
        """The corrected learning signal (no gradient) for f [B] and a baseline b(x) [B]."""
        l = (f - baseline).detach()
        if update:
            with torch.no_grad():
                a = (self.steps > 0).float() * self.decay  # the first batch sets the averages (no host read)
                self.mean.mul_(a).add_((1 - a) * l.mean())
                self.var.mul_(a).add_((1 - a) * ((l - self.mean) ** 2).mean())
                self.steps += 1
        signal = l - self.mean
        return signal / self.var.sqrt().clamp(min=1.0) if self.normalize else signal
