"""ECE on a hand-computed example, AUROC against scikit-learn, and the corruptions' definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from scalegen.metrics.calibration import calibration_bins, expected_calibration_error
from scalegen.metrics.ood import auroc, corrupt


def test_ece_hand_computed() -> None:
    """Four examples, 2 classes, 15 bins. Confidences 0.95, 0.95 (bin 14; one right, one wrong: accuracy
    0.5, |0.5 - 0.95| = 0.45), 0.58 (right) and 0.55 (wrong), both in bin 8 = (8/15, 9/15]:
    accuracy 1/2, confidence 0.565 -> 0.065. ECE = 2/4 * 0.45 + 2/4 * 0.065 = 0.2575."""
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.42, 0.58], [0.55, 0.45]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    assert expected_calibration_error(probs.log(), labels) == pytest.approx(0.2575, abs=1e-9)
    stats = calibration_bins(probs.log(), labels)
    assert stats["count"].tolist() == [0] * 8 + [2] + [0] * 5 + [2]


def test_perfectly_calibrated_predictions_have_ece_near_zero() -> None:
    g = torch.Generator().manual_seed(0)
    n = 200_000
    conf = torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + 0.5
    correct = torch.rand(n, generator=g, dtype=torch.float64) < conf  # right with probability = confidence
    labels = torch.where(correct, 0, 1)
    probs = torch.stack([conf, 1 - conf], 1)
    # Per bin |acc - conf| is a binomial fluctuation of ~sqrt(p(1-p)/n_b); 15 bins of ~27k examples each.
    assert expected_calibration_error(probs.log(), labels) < 0.01


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = np.round(rng.normal(0.5, 1, 300), 1)  # rounding makes ties
    b = np.round(rng.normal(0, 1, 200), 1)
    ours = auroc(torch.tensor(a), torch.tensor(b))
    ref = roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[a, b])
    assert ours == pytest.approx(ref, abs=1e-12)
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.ones(5), torch.ones(7)) == 0.5


def test_corruptions() -> None:
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(corrupt(x, "inverted"), 255 - x)
    p = corrupt(x, "pixel_permuted", seed=3)
    assert torch.equal(p.flatten(1).sort(1).values, x.flatten(1).sort(1).values)  # same pixels, moved
    assert torch.equal(corrupt(x, "pixel_permuted", seed=3), p) and not torch.equal(p, x)
    u = corrupt(torch.zeros(1000, 1, 8, 8, dtype=torch.uint8), "uniform_noise")
    assert abs(u.float().mean().item() - 127.5) < 3 * 73.9 / math.sqrt(u.numel())


def test_match_images_converts_channels_and_size() -> None:
    from scalegen.metrics.ood import match_images

    rgb = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    rgb[:, 0], rgb[:, 1], rgb[:, 2] = 30, 60, 90
    grey = match_images(rgb, (1, 8, 8))
    assert grey.shape == (2, 1, 8, 8) and grey.dtype == torch.uint8 and bool((grey == 60).all())
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 255  # 2x2 blocks average to 127.5
    down = match_images(checker.to(torch.uint8).expand(1, 1, 16, 16), (3, 8, 8))
    assert down.shape == (1, 3, 8, 8) and bool(((down.int() - 128).abs() <= 3).all())  # the border: +-3
    same = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(match_images(same, (1, 8, 8)), same)
