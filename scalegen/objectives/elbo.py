"""Gaussian-latent variational bounds (Kingma & Welling 2014; Burda et al. 2016) and
likelihoods of discrete pixel data. Every log-probability is summed over all but the batch dim."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(mu: Tensor, logvar: Tensor, prior_mu: Tensor | float = 0.0,
                prior_logvar: Tensor | float = 0.0) -> Tensor:
    """KL( N(mu, e^logvar) || N(prior_mu, e^prior_logvar) ) per example, closed form."""
    prior_logvar = torch.as_tensor(prior_logvar, dtype=mu.dtype, device=mu.device)
    kl = 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu) ** 2) / prior_logvar.exp() - 1)
    return kl.flatten(1).sum(1)


def log_normal(z: Tensor, mu: Tensor | float, logvar: Tensor | float) -> Tensor:
    """log N(z; mu, e^logvar) summed over the last dimension."""
    logvar = torch.as_tensor(logvar, dtype=z.dtype, device=z.device)
    return (-0.5 * (LOG_2PI + logvar + (z - mu) ** 2 / logvar.exp())).sum(-1)


def bernoulli_log_prob(x_binary: Tensor, logits: Tensor) -> Tensor:
    return -F.binary_cross_entropy_with_logits(logits, x_binary, reduction="none").flatten(1).sum(1)


def _log_sub_exp(a: Tensor, b: Tensor) -> Tensor:
    """log(e^a - e^b) for a >= b, stable."""
    return a + torch.log1p(-torch.exp((b - a).clamp(max=-1e-6)))


def _log_cdf(u: Tensor, dist: str) -> Tensor:
    """log CDF of the standardized logistic or Gaussian (both symmetric: log SF(u) = log CDF(-u))."""
    return F.logsigmoid(u) if dist == "logistic" else torch.special.log_ndtr(u)


def discretized_log_prob(x_uint8: Tensor, mean: Tensor, log_scale: Tensor, dist: str = "logistic") -> Tensor:
    """log P(x) of 8-bit data under a continuous density on [-1, 1] integrated over each pixel's bin
    of width 2/255; the edge bins take the tails (Salimans et al. 2017, eq. 2). dist: logistic | gaussian."""
    x = x_uint8.float() / 127.5 - 1
    inv_scale = torch.exp(-log_scale)
    u_plus = (x + 1 / 255 - mean) * inv_scale
    u_minus = (x - 1 / 255 - mean) * inv_scale
    # Interior bins: CDF(u+) - CDF(u-), or SF(u-) - SF(u+) right of the mode, where it loses less to round-off.
    right = u_minus > 0
    hi = torch.where(right, _log_cdf(-u_minus, dist), _log_cdf(u_plus, dist))
    lo = torch.where(right, _log_cdf(-u_plus, dist), _log_cdf(u_minus, dist))
    mid = _log_sub_exp(hi, lo)
    logp = torch.where(x_uint8 == 0, _log_cdf(u_plus, dist),
                       torch.where(x_uint8 == 255, _log_cdf(-u_minus, dist), mid))
    return logp.flatten(1).sum(1)


def iwae_bound(log_weights: Tensor) -> Tensor:
    """log (1/K) sum_k w_k from log-weights [K, B]: the IWAE-K lower bound on log p(x) (Burda et al. eq. 8)."""
    return torch.logsumexp(log_weights, 0) - math.log(log_weights.shape[0])
