"""Bits per dimension: one definition for every likelihood family (see docs/evaluation.md).

Every family's `nll(x)` returns the negative log-likelihood of the *discrete* data in nats per example.
Bits/dim divides it by D*ln(2), with D the number of data dimensions (C*H*W for images). Two helpers
turn other quantities into that one:

* `discrete_nll_from_density`: a continuous density on the data range is turned into the probability
  of the quantization bin under uniform dequantization: -log P(bin) = -log p(x) + D*log(levels/range).
  A density on [0, 1)^D for 8-bit images adds D*log(256) nats (`dequantization_offset`).
* Bernoulli (binarized) data needs no conversion: its NLL already is a discrete NLL (levels = 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def nats_to_bpd(nll_nats: Tensor | float, dims: int) -> Tensor | float:
    """Negative log-likelihood of one example in nats -> bits per dimension."""
    return nll_nats / (dims * math.log(2))


def bpd_to_nats(bpd: Tensor | float, dims: int) -> Tensor | float:
    """Bits per dimension -> negative log-likelihood of one example in nats (inverse of `nats_to_bpd`)."""
    return bpd * dims * math.log(2)


def dequantization_offset(dims: int, levels: int = 256) -> float:
    """Nats to add to -log p(x/levels) of a density on [0,1)^D to get the discrete NLL of 8-bit data."""
    return dims * math.log(levels)


def discrete_nll_from_density(
    nll_density_nats: Tensor | float, dims: int, levels: int = 256, data_range: float = 1.0
) -> Tensor | float:
    """-log P(bin) of quantized data from -log p(x) of a density over a box of side `data_range`.

    Uniform dequantization: the data has `levels` bins over the range, each of width
    `data_range/levels`, so P(bin) = p(x) * (data_range/levels)^D and
    -log P(bin) = -log p(x) + D*log(levels/data_range). Use data_range=2 for a density on [-1, 1]^D.
    """
    return nll_density_nats + dims * math.log(levels / data_range)


def uniform_bpd(levels: int = 256) -> float:
    """Bits/dim of the model uniform over `levels` values per dimension: log2(levels) (8.0 for 8-bit)."""
    return math.log2(levels)


def entropy_bpd(probs: Tensor) -> float:
    """Bits/dim of a factorized categorical model scored on its own distribution: its mean entropy.

    `probs` is [D, levels] (one categorical per dimension, rows summing to 1); the expected NLL of data drawn
    from it is sum_d H(p_d), i.e. mean_d H(p_d) / ln 2 bits per dimension.
    """
    p = probs.double()
    h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return float(h.mean() / math.log(2))


def summarize_bpd(nll_nats: Tensor, dims: int) -> dict[str, float]:
    """Mean bits/dim over examples, with its standard error and the example count."""
    bpd = nats_to_bpd(nll_nats.double(), dims)
    n = bpd.numel()
    sem = float(bpd.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(bpd.mean()), "sem": sem, "count": n}
