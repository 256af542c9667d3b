"""Linear probes: separable features are probed well, noise is at chance, grid heads are independent."""

from __future__ import annotations

import torch

from scalegen.probes import ProbeSettings, labelled_subset, linear_probe
from scalegen.probes.linear import fit_heads, standardize


def clusters(n: int, d: int = 12, k: int = 5, spread: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.arange(n) % k
    return centres[y] + spread * torch.randn(n, d, generator=g), y


FAST = ProbeSettings(steps=60, seeds=(0, 1))


def test_separable_features_are_probed_accurately_and_noise_is_at_chance():
    xtr, ytr = clusters(300, seed=0)
    xte, yte = clusters(200, seed=1)
    good = linear_probe(xtr, ytr, xte, yte, 5, FAST)
    assert good.accuracy_mean > 0.95 and len(good.accuracies) == 2 and good.num_train == 300
    noise = linear_probe(torch.randn(300, 12), ytr, torch.randn(200, 12), yte, 5, FAST)
    assert noise.accuracy_mean < 0.4  # chance is 0.2
    assert good.accuracy_std == torch.tensor(good.accuracies, dtype=torch.float64).std(unbiased=False).item()


def test_semi_supervised_probe_sees_only_n_labels_per_class():
    xtr, ytr = clusters(300, seed=0)
    xte, yte = clusters(200, seed=1)
    r = linear_probe(xtr, ytr, xte, yte, 5, FAST, labels_per_class=3)
    assert r.num_train == 15 and r.accuracy_mean > 0.8
    a, b = labelled_subset(ytr, 3, seed=0), labelled_subset(ytr, 3, seed=1)
    assert torch.bincount(ytr[a]).tolist() == [3] * 5 and set(a.tolist()) != set(b.tolist())
    assert len(labelled_subset(torch.tensor([0, 0, 1, -1, -1]), 5, 0)) == 3  # unlabelled never drawn


def test_a_grid_trains_each_head_as_if_alone():
    x, y = clusters(200, seed=2)
    (xs,) = standardize(x)
    s = ProbeSettings(steps=25, batch_size=64)
    w_grid, b_grid = fit_heads(xs, y, 5, [1e-4, 1e-1], s, seed=3)
    for i, wd in enumerate([1e-4, 1e-1]):
        w_one, b_one = fit_heads(xs, y, 5, [wd], s, seed=3)
        torch.testing.assert_close(w_grid[i], w_one[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b_grid[i], b_one[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w_grid[0], w_grid[1])  # the penalty made a difference
