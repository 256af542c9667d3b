"""Bits/dim: closed forms (uniform = log2 levels, density -> discrete conversions, categorical entropy)."""

from __future__ import annotations

import math

import torch

from scalegen.metrics.bpd import (
    bpd_to_nats,
    dequantization_offset,
    discrete_nll_from_density,
    entropy_bpd,
    nats_to_bpd,
    summarize_bpd,
    uniform_bpd,
)


def test_uniform_over_256_levels_is_exactly_8_bits():
    dims = 3 * 32 * 32
    nll = torch.full((5,), dims * math.log(256), dtype=torch.float64)  # -log (1/256)^D
    assert torch.allclose(nats_to_bpd(nll, dims), torch.full((5,), 8.0, dtype=torch.float64), atol=1e-12)
    assert uniform_bpd(256) == 8.0
    assert uniform_bpd(2) == 1.0


def test_round_trip():
    assert math.isclose(bpd_to_nats(nats_to_bpd(123.4, 784), 784), 123.4)


def test_uniform_density_on_unit_box_dequantizes_to_8_bits():
    dims = 784
    # A uniform density on [0,1)^D has -log p = 0; each 8-bit bin then has probability 256^-D.
    assert math.isclose(nats_to_bpd(discrete_nll_from_density(0.0, dims), dims), 8.0)
    assert math.isclose(dequantization_offset(dims), dims * math.log(256))
    # The same data scaled to [-1, 1): density 2^-D, so -log p = D log 2; still 8 bits per bin.
    nll = discrete_nll_from_density(dims * math.log(2), dims, levels=256, data_range=2.0)
    assert math.isclose(nats_to_bpd(nll, dims), 8.0)


def test_factorized_categorical_scores_its_entropy():
    """Monte Carlo: data drawn from a factorized categorical scores its analytic entropy (4 s.e.)."""
    g = torch.Generator().manual_seed(0)
    dims, levels, n = 16, 5, 20000
    logits = torch.randn(dims, levels, generator=g) * 2
    p = torch.softmax(logits.double(), -1)
    x = torch.stack([torch.multinomial(p[d], n, replacement=True, generator=g) for d in range(dims)], 1)
    nll = -torch.log(p).gather(1, x.T).T.sum(1)  # [n] nats
    s = summarize_bpd(nll, dims)
    assert s["count"] == n
    assert abs(s["mean"] - entropy_bpd(p)) < 4 * s["sem"]
    # The analytic entropy itself, computed independently per dimension.
    h = sum(float(-(p[d] * p[d].log()).sum()) for d in range(dims)) / dims / math.log(2)
    assert math.isclose(entropy_bpd(p), h, rel_tol=1e-12)
