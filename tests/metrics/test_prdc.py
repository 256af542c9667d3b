"""Precision, recall, density and coverage against brute force, closed forms and Gaussians."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scalegen.metrics.prdc import expected_coverage, prdc


def brute_force(real: np.ndarray, fake: np.ndarray, k_pr: int, k_dc: int) -> dict[str, float]:
    """The papers' definitions written out with Python loops over pairs (no shared code)."""

    def radius(points, i, k):
        return sorted(math.dist(points[i], points[j]) for j in range(len(points)) if j != i)[k - 1]

    rr_pr = [radius(real, i, k_pr) for i in range(len(real))]
    rr_dc = [radius(real, i, k_dc) for i in range(len(real))]
    rf = [radius(fake, j, k_pr) for j in range(len(fake))]
    d = [[math.dist(f, r) for r in real] for f in fake]
    precision = np.mean([any(d[j][i] <= rr_pr[i] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(d[j][i] <= rf[j] for j in range(len(fake))) for i in range(len(real))])
    density = sum(d[j][i] <= rr_dc[i] for j in range(len(fake)) for i in range(len(real))) / (k_dc * len(fake))
    coverage = np.mean([min(d[j][i] for j in range(len(fake))) <= rr_dc[i] for i in range(len(real))])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("block", [1, 4, 1024])
def test_matches_brute_force_on_a_tiny_set(block):
    real = np.random.default_rng(3).normal(size=(13, 3))
    fake = np.random.default_rng(4).normal(size=(9, 3)) * 0.8 + 1.5  # overlapping, not identical
    want = brute_force(real, fake, 3, 5)
    got = prdc(real, fake, 3, 5, block=block, dtype=torch.float64)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert (got["num_real"], got["num_fake"], got["k_pr"], got["k_dc"]) == (13, 9, 3, 5)
    # Not all trivially 0 or 1: the set exercises both sides of every indicator.
    assert all(0 < got[key] < 1 for key in want), got


def test_float32_default_agrees_with_float64():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(400, 64)) * 10, rng.normal(size=(300, 64)) * 10
    a, b = prdc(real, fake), prdc(real, fake, dtype=torch.float64)
    for key in ("precision", "recall", "density", "coverage"):
        # A pair within float32 round-off of a ball's boundary could flip: allow one point of 300.
        assert abs(a[key] - b[key]) <= 1 / 300 + 1e-12, key


def test_identical_gaussians_give_precision_and_recall_near_one():
    # The union of k-NN balls covers the support except a thin shell beyond the sample's outermost
    # points; in 2-D with 2,000 points per set that shell holds ~2-3 % of the mass (measured 0.97-0.98
    # for both), hence the 0.95 bound. It tends to 1 as N grows; in high dimension far more slowly
    # (0.79 in 16-d, 0.6 in 64-d at the same N, measured), which is why the test is low-dimensional.
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(2000, 2, generator=g), torch.randn(2000, 2, generator=g)
    r = prdc(real, fake)
    assert r["precision"] > 0.95 and r["recall"] > 0.95


def test_density_and_coverage_expectations_for_identical_distributions():
    # Closed forms (see expected_coverage): E[density] = 1 exactly (a fake point is inside a given real
    # point's k-NN ball with probability k/N by exchangeability) and E[coverage] = 1 - prod (N-j)/(N-j+M).
    # Monte Carlo over 100 independent pairs of sets; tolerance 4 standard errors of the mean
    # (per-pair std measured ~0.05 for density, ~0.009 for coverage at these sizes).
    n, m, d, reps = 300, 200, 8, 100
    dens, cov = [], []
    for s in range(reps):
        g = torch.Generator().manual_seed(s)
        r = prdc(torch.randn(n, d, generator=g), torch.randn(m, d, generator=g))
        dens.append(r["density"])
        cov.append(r["coverage"])
    dens, cov = np.array(dens), np.array(cov)
    assert abs(dens.mean() - 1.0) < 4 * dens.std(ddof=1) / math.sqrt(reps)
    assert abs(cov.mean() - expected_coverage(n, m, 5)) < 4 * cov.std(ddof=1) / math.sqrt(reps)


def test_shrunken_generator_is_precise_but_not_diverse_and_a_spread_one_the_reverse():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 8, generator=g)
    shrunk = prdc(real, 0.5 * torch.randn(1000, 8, generator=g))
    assert shrunk["precision"] > 0.95 and shrunk["recall"] < 0.3  # measured 0.997 and 0.18
    assert shrunk["density"] > 1.5  # fakes crowd into the dense core: in many real balls each (1.9)
    spread = prdc(real, 2.0 * torch.randn(1000, 8, generator=g))
    assert spread["precision"] < 0.3 and spread["recall"] > 0.95  # measured 0.18 and 0.998
    assert spread["coverage"] < 0.5  # most real balls hold no generated point (0.32)


def test_bad_input():
    with pytest.raises(ValueError, match="more than k=5"):
        prdc(np.zeros((5, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="dimensions differ"):
        prdc(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="shape"):
        prdc(np.zeros(10), np.zeros((10, 3)))
