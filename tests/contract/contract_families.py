"""Three small test-only families that exercise the parts of the family contract the built-in families do
not: per-rank state, a frozen first stage, and a labelled stream. Importing this module registers them
(only the tests and their worker processes import it; the package never does).

Each models the 8x8 digits with an exact factorized categorical likelihood (one softmax over the 256
levels per pixel), so `nll` is real and training moves real weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scalegen.config.schema import ModelConfig, OptimConfig, ranged
from scalegen.dataspec import DataSpec
from scalegen.families.base import GenerativeModel
from scalegen.registry import register_family


class Factorized(GenerativeModel):
    """-log p(x) = -sum_d log softmax(logits_d)[x_d]: exact, in nats."""

    predictions = frozenset({"nll", "sample"})
    nll_kind = "exact"

    def __init__(self, cfg: ModelConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        self.logits = nn.Parameter(torch.zeros(data.dims, data.levels))

    def nll(self, x: Tensor, y: Tensor | None = None, k: int | None = None) -> Tensor:
        log_p = torch.log_softmax(self.logits, -1)
        return -log_p.gather(1, x.long().flatten(1).T).sum(0)

    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            draws = torch.multinomial(torch.softmax(self.logits, -1), n, replacement=True).T
        return draws.reshape(n, *self.data_spec.shape).to(torch.uint8)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.nll(batch["x"]).mean(), {}


# ---- (a) a per-rank replay buffer ----------------------------------------------------------------
@dataclass
class BufferedConfig(ModelConfig):
    family: str = "test_buffered"
    buffer_size: int = ranged(12, ge=1)  # examples each rank keeps


@register_family("test_buffered", BufferedConfig, "test only: a per-rank replay buffer in the loss")
class Buffered(Factorized):
    """The loss adds the NLL of a per-rank buffer of earlier examples (a random subset of what this rank
    has seen, like an EBM's replay buffer), so the weights after a resume depend on every rank getting
    its own buffer back."""

    def __init__(self, cfg: BufferedConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        self.buffer = torch.zeros(0, *data.shape, dtype=torch.uint8)
        self.updates = 0

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self.nll(batch["x"]).mean()
        if len(self.buffer):
            loss = loss + self.nll(self.buffer.to(self.device)).mean()
        return loss, {"buffered": torch.tensor(float(len(self.buffer)))}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        # Updated inside the step, so a checkpoint written at this batch's end (callbacks run first) has it.
        pool = torch.cat([self.buffer, batch["x"].cpu()])
        keep = torch.randperm(len(pool))[: self.cfg.buffer_size]  # the global RNG: resumed by RankState
        self.buffer, self.updates = pool[keep], self.updates + 1
        return loss

    def rank_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.clone(), "updates": self.updates}

    def load_rank_state(self, state: dict[str, Any], saved_world_size: int, world_size: int) -> None:
        if saved_world_size != world_size:  # re-deal: rank r takes saved ranks r, r + W, r + 2W, ...
            rank = self.global_rank
            mine = [state[s] for s in sorted(state) if s % world_size == rank]
            state = {"buffer": torch.cat([m["buffer"] for m in mine])[: self.cfg.buffer_size],
                     "updates": max(m["updates"] for m in mine)}
        self.buffer, self.updates = state["buffer"].clone(), int(state["updates"])


# ---- (b) a frozen first stage --------------------------------------------------------------------
@dataclass
class LatentPriorConfig(ModelConfig):
    family: str = "test_latent_prior"
    stage1: str | None = None  # the first stage: a checkpoint or run folder of a model that can `encode`


@register_family("test_latent_prior", LatentPriorConfig, "test only: a Gaussian prior over a frozen encoder")
class LatentPrior(GenerativeModel):
    """A diagonal Gaussian N(mu, sigma^2) fitted by maximum likelihood to a frozen first stage's codes
    z = stage1.encode(x); `encode` returns the standardized codes (z - mu) / sigma."""

    predictions = frozenset({"encode"})

    def __init__(self, cfg: LatentPriorConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        self.stage1 = self.load_stage1()
        dim = int(self.stage1.encode(torch.zeros(1, *data.shape, dtype=torch.uint8)).shape[1])
        self.mu = nn.Parameter(torch.zeros(dim))
        self.log_sigma = nn.Parameter(torch.zeros(dim))

    def codes(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.stage1.encode(x).float()

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        u = (self.codes(batch["x"]) - self.mu) * torch.exp(-self.log_sigma)
        nll = 0.5 * (u**2).sum(1) + self.log_sigma.sum()  # Gaussian NLL up to a constant
        return nll.mean(), {}

    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return (self.codes(x) - self.mu) * torch.exp(-self.log_sigma)


# ---- (c) partly labelled data: a labelled stream beside the main one -----------------------------
@dataclass
class SemiSupervisedConfig(ModelConfig):
    family: str = "test_semisup"


@register_family("test_semisup", SemiSupervisedConfig, "test only: NLL of every batch + a classifier on labels")
class SemiSupervised(Factorized):
    """NLL on the main stream plus a linear classifier's cross-entropy on the labelled stream. Records,
    per rank and across resumes (rank state), every (key, label) it was given a label for."""

    predictions = frozenset({"nll", "sample", "classify"})
    labelled_stream = True

    def __init__(self, cfg: SemiSupervisedConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        self.head = nn.Linear(data.dims, data.num_classes)
        self.seen: dict[str, int] = {}  # key -> label, every labelled example this rank was given

    def classify(self, x: Tensor) -> Tensor:
        return torch.log_softmax(self.head(x.float().flatten(1) / 255.0), -1)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self.nll(batch["x"]).mean()
        if "x_labelled" in batch:
            loss = loss + F.nll_loss(self.classify(batch["x_labelled"]), batch["y_labelled"])
        return loss, {}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        pairs = list(zip(batch["key_labelled"], batch["y_labelled"].tolist()))
        pairs += [(k, y) for k, y in zip(batch["key"], batch["y"].tolist()) if y >= 0]
        self.seen.update((str(k), int(y)) for k, y in pairs)
        return loss

    def rank_state(self) -> dict[str, Any]:
        return {"keys": sorted(self.seen), "labels": [self.seen[k] for k in sorted(self.seen)]}

    def load_rank_state(self, state: dict[str, Any], saved_world_size: int, world_size: int) -> None:
        super().load_rank_state(state, saved_world_size, world_size)  # refuses another world size
        self.seen = dict(zip(state["keys"], state["labels"]))
