"""Partly labelled training data: `data.labels_per_class` keeps the labels of exactly N examples per class.

Which examples keep their label is a function of the sample keys and `data.label_seed` alone: within each
class the keys are ranked by a seeded hash and the first N keep their label. It does not depend on shard
order, rank, world size, epoch or where a run resumed, so every rank masks the same examples, always.
Every rank reads the labels of the whole training split once to find them (the `cls` members only).

A family with `labelled_stream = True` also gets, in every training batch, `x_labelled`, `y_labelled` and
`key_labelled`: a batch drawn from the labelled examples, which are few, so they are decoded once and kept
in memory. The draws walk an endless sequence of permutations of them (one per pass, seeded by the label
seed, the data seed, the rank and the pass), and the n-th training batch of a rank takes the n-th batch of
that sequence: the labelled batch is a function of the data position, so a resume continues it exactly.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch

from scalegen.data.manifest import DataError
from scalegen.data.pipeline import hash_seed


def _rank_key(seed: int, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()


def choose_labelled(
    samples: Iterable[tuple[str, int]], per_class: int, seed: int, num_classes: int
) -> dict[str, int]:
    """{key: label} of exactly `per_class` examples of each of the `num_classes` classes among (key, label)
    pairs (label -1 = unlabelled, ignored). A class with fewer examples is a `DataError` naming it."""
    by_class: dict[int, list[str]] = defaultdict(list)
    for key, label in samples:
        if label >= 0:
            by_class[label].append(key)
    short = {c: len(by_class[c]) for c in range(num_classes) if len(by_class[c]) < per_class}
    if short:
        c, n = next(iter(short.items()))
        raise DataError(
            f"data.labels_per_class={per_class} but class {c} has only {n} labelled training examples"
            f" ({len(short)} class(es) too small): lower data.labels_per_class to at most {min(short.values())}"
        )
    chosen: dict[str, int] = {}
    for c in range(num_classes):
        for key in sorted(by_class[c], key=lambda k: _rank_key(seed, k))[:per_class]:
            chosen[key] = c
    return chosen


def mask_labels(y: torch.Tensor, keys: Sequence[str], labelled: dict[str, int]) -> torch.Tensor:
    """`y` with -1 wherever the key is not one of the labelled examples."""
    keep = torch.tensor([k in labelled for k in keys], dtype=torch.bool)
    return torch.where(keep, y, torch.full_like(y, -1))


class LabelledSet:
    """The labelled examples, decoded, in memory (`x` [n, ...], `y` [n], `keys`), and the batches drawn from them."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, keys: list[str], batch_size: int, seed: tuple[int, ...]
    ) -> None:
        if len(x) == 0:
            raise DataError("no labelled example could be read for the labelled stream")
        self.x, self.y, self.keys = x, y, keys
        self.batch_size = min(batch_size, len(x))  # a batch never holds one example twice
        self.seed = seed

    def batch(self, step: int) -> dict[str, object]:
        """The labelled batch of a rank's `step`-th training batch (counted over all epochs). A pass over the
        labelled examples is n // b batches of one permutation; the n % b left over differ from pass to pass."""
        n, b = len(self.x), self.batch_size
        per_pass = n // b
        p, i = divmod(step, per_pass)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(hash_seed(*self.seed, p)))
        idx = order[i * b : (i + 1) * b]
        keys = [self.keys[j] for j in idx.tolist()]
        return {"x_labelled": self.x[idx], "y_labelled": self.y[idx], "key_labelled": keys}
