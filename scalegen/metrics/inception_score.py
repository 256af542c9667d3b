"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), over `splits` equal chunks.

p(y|x) is the softmax of the classifier logits; p(y) is the mean of p(y|x) within a chunk. The score
is computed per chunk (the last chunk takes the remainder) and reported as the mean and standard
deviation over chunks, the protocol of the original code (10 splits). It ranges from 1 (every
prediction identical) to the number of classes (confident predictions spread evenly).
"""

from __future__ import annotations

import numpy as np
import torch


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> dict[str, float]:
    """Mean and std over `splits` chunks of exp(mean KL(p(y|x) || p(y))) from logits [N, C]."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    logp = torch.log_softmax(z, dim=1)
    n = z.shape[0]
    splits = max(1, min(splits, n))
    scores = []
    for chunk in torch.tensor_split(logp, splits):
        log_py = torch.logsumexp(chunk, dim=0) - np.log(chunk.shape[0])  # log of the chunk's marginal p(y)
        kl = (chunk.exp() * (chunk - log_py)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    s = np.asarray(scores)
    return {"mean": float(s.mean()), "std": float(s.std()), "splits": splits}
