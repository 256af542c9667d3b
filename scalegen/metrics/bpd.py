"""Bits per dimension: one definition for every likelihood family (see docs/evaluation.md)."""

from __future__ import annotations

import math

from torch import Tensor


def nats_to_bpd(nll_nats: Tensor | float, dims: int) -> Tensor | float:
    """Negative log-likelihood of one example in nats -> bits per dimension."""
    return nll_nats / (dims * math.log(2))


def dequantization_offset(dims: int, levels: int = 256) -> float:
    """Nats to add to -log p(x/levels) of a density on [0,1)^D to get the discrete NLL of 8-bit data."""
    return dims * math.log(levels)

