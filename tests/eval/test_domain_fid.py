"""Domain FID on MNIST: a classifier trained on MNIST by scalegen as the feature extractor.

Two halves of the test set are close; MNIST against uniform noise, or against a single digit class,
is far. Reads the shared IDX files directly with numpy (no data pipeline needed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_models import read_mnist  # noqa: E402

from scalegen.metrics.domain import DomainTraining, accuracy, load_or_train  # noqa: E402
from scalegen.metrics.fid import fid_from_features  # noqa: E402


def test_domain_fid_separates_real_from_noise_and_from_one_class(shared_datasets, tmp_path):
    xtr, ytr = read_mnist(shared_datasets / "mnist", "train")
    xte, yte = read_mnist(shared_datasets / "mnist", "test")
    recipe = DomainTraining(epochs=2, min_steps=0, max_examples=4000)
    net, key = load_or_train("mnist", xtr, ytr, 10, recipe, cache=tmp_path)
    assert accuracy(net, xte[:2000], yte[:2000]) > 0.8  # a real digit classifier (chance: 0.1), from 63 steps
    again, key2 = load_or_train("mnist", xtr, ytr, 10, recipe, cache=tmp_path)  # from the cache
    assert key2 == key and len(list(tmp_path.glob("mnist-*.pt"))) == 1
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)

    with torch.no_grad():
        feats = lambda x: torch.cat([net(x[i : i + 1000])[0] for i in range(0, len(x), 1000)])  # noqa: E731
        half_a, half_b = feats(xte[:1500]), feats(xte[1500:3000])
        noise = feats(
            torch.randint(0, 256, (2000, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        )
        ones = feats(xte[yte == 1])
    same = fid_from_features(half_a, half_b)
    vs_noise = fid_from_features(half_a, noise)
    vs_one_class = fid_from_features(half_a, ones)
    assert same >= 0
    assert vs_noise > 10 * same, (same, vs_noise)
    assert vs_one_class > 5 * same, (same, vs_one_class)
