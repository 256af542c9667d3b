"""Small real GenerativeModel subclasses for the evaluation tests (no mocks: real nll/sample/encode)."""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from scalegen.config.schema import ModelConfig, OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.families.base import GenerativeModel


@dataclass
class ToyConfig(ModelConfig):
    family: str = "toy"
    features: int = 16  # width of the linear encoder


class FactorizedCategorical(GenerativeModel):
    """Independent categorical over `levels` values per dimension: exact NLL, ancestral samples."""

    predictions = frozenset({"nll", "sample", "encode"})
    nll_kind = "exact"

    def __init__(self, cfg: ToyConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        self.logits = nn.Parameter(torch.zeros(data.dims, data.levels))
        self.enc = nn.Linear(data.dims, cfg.features)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        nll = self.nll(batch["x"]).mean()
        return nll, {}

    def log_probs(self) -> Tensor:
        return torch.log_softmax(self.logits, dim=-1)

    def nll(self, x: Tensor, y: Tensor | None = None, k: int | None = None) -> Tensor:
        idx = x.long().flatten(1)  # [B, D]
        lp = self.log_probs()  # [D, L]
        return -lp.gather(1, idx.T).T.sum(1)

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        p = self.log_probs().exp()
        s = torch.multinomial(p, n, replacement=True).T  # [n, D]
        return s.reshape(n, *self.data_spec.shape).to(torch.uint8)

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return torch.tanh(self.enc(x.float().flatten(1) / 255.0))


class WithClassifier(FactorizedCategorical):
    """The same, plus the semi-supervised hook `classify(x) -> logits` (a nearest-class-mean rule)."""

    predictions = frozenset({"nll", "sample", "encode", "classify"})

    def __init__(self, cfg: ToyConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        self.register_buffer("means", torch.zeros(data.num_classes, data.dims))

    def fit_means(self, x: Tensor, y: Tensor) -> None:
        for c in range(self.data_spec.num_classes):
            self.means[c] = x[y == c].float().flatten(1).mean(0)

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        return -torch.cdist(x.float().flatten(1), self.means)


def make_model(cls=FactorizedCategorical, shape=(1, 8, 8), levels=256, num_classes=10, seed=0):
    spec = DataSpec(kind="image", shape=shape, num_classes=num_classes, levels=levels)
    torch.manual_seed(seed)
    return cls(ToyConfig(), OptimConfig(), spec)


def fit_to(model: FactorizedCategorical, x: Tensor, alpha: float = 0.5) -> None:
    """Set the categorical to the smoothed empirical per-pixel histogram of x (a fitted model)."""
    idx = x.long().flatten(1)
    counts = torch.zeros_like(model.logits)
    counts.scatter_add_(1, idx.T.contiguous(), torch.ones_like(idx.T, dtype=counts.dtype))
    with torch.no_grad():
        model.logits.copy_((counts + alpha).log())


def blobs(n: int, num_classes: int = 10, size: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Labelled uint8 grey images: class c lights row c % size (and a column for c >= size), plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    x = torch.rand(n, 1, size, size, generator=g) * 60
    for c in range(num_classes):
        m = y == c
        x[m, 0, c % size, :] += 180
        if c >= size:
            x[m, 0, :, (3 * (c - size) + 1) % size] += 120
    return x.clamp(0, 255).to(torch.uint8), y


def read_mnist(root: Path, split: str) -> tuple[Tensor, Tensor]:
    """MNIST images uint8 [N, 1, 28, 28] and labels int64 [N] straight from the IDX .gz files."""
    prefix = "train" if split == "train" else "t10k"
    images = np.frombuffer(gzip.open(root / f"{prefix}-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return torch.from_numpy(images.reshape(-1, 1, 28, 28).copy()), torch.from_numpy(labels.astype(np.int64))


def entropy_nats(logits: Tensor) -> float:
    p = torch.softmax(logits.double(), -1)
    return float(-(p * p.log()).sum())


LOG2 = math.log(2)
