"""Frechet distance, KID and Inception Score against closed forms and direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from scalegen.metrics.fid import feature_statistics, fid_from_features, frechet_distance
from scalegen.metrics.inception_score import inception_score
from scalegen.metrics.kid import kernel_inception_distance, mmd2_unbiased


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def direct_fid(mu1, s1, mu2, s2) -> float:
    """Independent route: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), both symmetric, via eigh."""
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(
        np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
    )


def test_frechet_matches_direct_computation():
    rng = np.random.default_rng(0)
    for d in (1, 5, 64):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = random_spd(d, rng), random_spd(d, rng)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
            direct_fid(mu1, s1, mu2, s2), rel=1e-7, abs=1e-9
        )
        # and the textbook formula with scipy's sqrtm
        ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-7, abs=1e-9)


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(1)
    s = random_spd(32, rng)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(float(np.sum((mu1 - mu2) ** 2)), rel=1e-7)


def test_one_dimensional_closed_form():
    # FID of N(m1, a^2) and N(m2, b^2) is (m1 - m2)^2 + (a - b)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(2).normal(size=(500, 16))
    assert abs(fid_from_features(x, x)) < 1e-6


def test_feature_statistics_are_mean_and_unbiased_covariance():
    x = np.random.default_rng(3).normal(size=(50, 4))
    mu, sigma = feature_statistics(torch.from_numpy(x))
    assert np.allclose(mu, x.mean(0))
    assert np.allclose(sigma, (x - x.mean(0)).T @ (x - x.mean(0)) / 49)


def test_singular_covariances_stay_finite():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(10, 3))
    x = a @ rng.normal(size=(3, 8))  # rank 3 in 8 dimensions
    y = a @ rng.normal(size=(3, 8)) + 1
    assert np.isfinite(fid_from_features(x, y))


def test_mmd_unbiased_matches_the_double_sum():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 3)) + 0.5
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    m = 7
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    got = mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y))
    assert got == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same = kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    diff = kernel_inception_distance(a, b + 1.0, num_subsets=20, subset_size=200)
    assert abs(same["mean"]) < 3 * same["std"] + 1e-3
    assert diff["mean"] > 10 * abs(same["mean"]) and diff["mean"] > 0.05
    assert same["subset_size"] == 200


def test_inception_score_limits():
    n, c = 1000, 10
    assert inception_score(torch.zeros(n, c))["mean"] == pytest.approx(1.0)  # identical predictions
    confident = torch.full((n, c), -50.0)
    confident[torch.arange(n), torch.arange(n) % c] = 50.0  # every class, evenly, with certainty
    s = inception_score(confident, splits=10)
    assert s["mean"] == pytest.approx(c, rel=1e-6)
    assert s["std"] == pytest.approx(0.0, abs=1e-6)
    one_class = torch.zeros(n, c)
    one_class[:, 3] = 50.0
    assert inception_score(one_class)["mean"] == pytest.approx(1.0, abs=1e-6)
