"""A domain feature extractor for small grey datasets: a classifier trained on the dataset by scalegen.

Inception features mean little on 28x28 digits, and the Inception weights may be absent. For such
data, "domain FID" uses the penultimate layer (64-d) of a small convolutional classifier trained on
the dataset's training split; "domain IS" uses its softmax. These numbers are comparable only with
other domain numbers computed with the same classifier (its checksum is reported), never with
Inception FID. The classifier is trained once per (dataset, data checksum, hyperparameters) and
cached under `$SCALEGEN_CACHE/domain/`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scalegen.metrics.weights import cache_dir

INPUT_SIZE = 28  # every input is resized to this (bilinear), so 8x8 digits and 28x28 MNIST share the net
FEATURE_DIM = 64


class DomainClassifier(nn.Module):
    """Three strided 3x3 conv layers (32, 64, 64 channels), a 64-d ReLU feature layer and a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, stride=2, padding=1),
            nn.ReLU(),  # 14x14
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),  # 7x7
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),  # 4x4
            nn.Flatten(),
            nn.Linear(64 * 16, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        """uint8 [N, C, H, W] -> float in [-1, 1] at 28x28."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(features [N, 64], logits [N, num_classes])."""
        h = self.body(self.preprocess(images))
        return h, self.head(h)


@dataclass
class DomainTraining:
    """How the domain classifier is trained (part of its cache key)."""

    epochs: int = 2  # passes over the training split
    min_steps: int = 500  # more passes when the split is small (1,347 digits), so it still trains well
    batch_size: int = 128
    lr: float = 3e-3  # Adam
    max_examples: int | None = None  # train on the first N examples only (None = all)
    seed: int = 0


def _data_checksum(x: Tensor, y: Tensor) -> str:
    h = hashlib.sha256()
    h.update(x.contiguous().numpy().tobytes())
    h.update(y.contiguous().numpy().tobytes())
    return h.hexdigest()


def train_domain_classifier(
    x: Tensor, y: Tensor, num_classes: int, recipe: DomainTraining
) -> DomainClassifier:
    """Train the classifier on uint8 images x [N, C, H, W] with labels y [N] (CPU, deterministic seed)."""
    with torch.enable_grad():  # callers (the eval runner) may be under no_grad
        return _train(x, y, num_classes, recipe)


def _train(x: Tensor, y: Tensor, num_classes: int, recipe: DomainTraining) -> DomainClassifier:
    gen = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        net = DomainClassifier(x.shape[1], num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    per_epoch = (len(x) + recipe.batch_size - 1) // recipe.batch_size
    epochs = max(recipe.epochs, math.ceil(recipe.min_steps / per_epoch))
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=max(1, steps))
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            _, logits = net(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval().requires_grad_(False)
    return net


@torch.no_grad()
def accuracy(net: DomainClassifier, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    correct = sum(
        int((net(x[i : i + batch_size])[1].argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    return correct / len(x)


def load_or_train(
    dataset: str,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    recipe: DomainTraining | None = None,
    cache: Path | None = None,
) -> tuple[DomainClassifier, str]:
    """The cached domain classifier for this training data, training it on first use; and its checksum."""

    recipe = recipe or DomainTraining()
    if recipe.max_examples is not None:
        x, y = x[: recipe.max_examples], y[: recipe.max_examples]
    key = hashlib.sha256(
        json.dumps(
            {
                "data": _data_checksum(x, y),
                "recipe": asdict(recipe),
                "classes": num_classes,
                "arch": "sconv32-64-64-fc64/v1",
            }
        ).encode()
    ).hexdigest()
    path = (cache or cache_dir() / "domain") / f"{dataset}-{key[:16]}.pt"
    net = DomainClassifier(x.shape[1], num_classes)
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net.eval().requires_grad_(False)
    else:
        net = train_domain_classifier(x, y, num_classes, recipe)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(net.state_dict(), tmp)
        tmp.replace(path)
    return net, key
