"""Autoregressive likelihoods: exact NLL as the sum of per-dimension conditionals.

For an autoregressive net, one forward pass over the data gives every conditional
p(x_i | x_<i) at once (teacher forcing), so -log p(x) = -sum_i log p(x_i | x_<i) exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _full(t: Tensor) -> Tensor:
    """At least float32: log-likelihoods are summed over thousands of dimensions, never in bf16."""
    return t if t.dtype == torch.float64 else t.float()


def categorical_nll(logits: Tensor, target: Tensor) -> Tensor:
    """-sum_i log softmax(logits)_i[target_i] per example, in nats -> [B].

    logits: [B, K, *dims] (K-way softmax over dim 1); target: integer [B, *dims] in {0..K-1}.
    """
    nll = F.cross_entropy(_full(logits), target.long(), reduction="none")
    return nll.reshape(nll.shape[0], -1).sum(1)


def bernoulli_nll(logits: Tensor, target: Tensor) -> Tensor:
    """-sum_i log Bernoulli(target_i; sigmoid(logit_i)) per example, in nats -> [B].

    logits: [B, 1, *dims] or [B, *dims]; target: {0, 1} [B, *dims].
    """
    if logits.dim() == target.dim() + 1:
        logits = logits.squeeze(1)
    nll = F.binary_cross_entropy_with_logits(_full(logits), target.to(_full(logits).dtype), reduction="none")
    return nll.reshape(nll.shape[0], -1).sum(1)


def autoregressive_nll(logits: Tensor, target: Tensor) -> Tensor:
    """Exact NLL [B] in nats from teacher-forced logits [B, K, *dims]: K = 1 Bernoulli, else softmax."""
    return bernoulli_nll(logits, target) if logits.shape[1] == 1 else categorical_nll(logits, target)


def binarize(x: Tensor, threshold: int = 128) -> Tensor:
    """8-bit image -> {0, 1} (static binarization at `threshold`)."""
    return (x >= threshold).to(torch.uint8)
