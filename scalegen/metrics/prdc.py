"""Precision, recall, density and coverage of generated samples, on k-NN balls of feature vectors.

With real features X (N of them), generated features Y (M) and NND_k(a) the distance from a to its
k-th nearest neighbour within its own set (itself excluded), B(a, r) the closed ball:

- improved precision (Kynkaanniemi et al. 2019, eq. 1-2): the fraction of generated points inside
  the real manifold, the union of B(x_i, NND_k(x_i)):  (1/M) sum_j 1[exists i: Y_j in B(X_i, NND_k(X_i))];
- improved recall: the same with the roles swapped (real points inside the generated manifold);
- density (Naeem et al. 2020, eq. 3): (1/(kM)) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))], how many real
  balls a generated point is in, on average, over k (1 in expectation when Y and X are identically
  distributed; can exceed 1);
- coverage (Naeem et al. 2020, eq. 4): (1/N) sum_i 1[exists j: Y_j in B(X_i, NND_k(X_i))], the fraction
  of real balls that hold at least one generated point (real radii only, so outliers among the generated
  points cannot inflate it).

Kynkaanniemi et al. use k = 3 for precision and recall; Naeem et al. recommend k = 5 for density and
coverage. Distances are Euclidean, computed in blocks of rows (`block` rows against a whole set at a
time) so that memory stays at block x max(N, M) entries; every pairwise distance is computed three
times in all (real-real and generated-generated for the radii, real-generated for the four metrics).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_tensor(a: np.ndarray | Tensor, dtype: torch.dtype, device: torch.device | None) -> Tensor:
    t = torch.as_tensor(np.asarray(a)) if not isinstance(a, Tensor) else a
    if t.ndim != 2:
        raise ValueError(f"need features of shape [N, D], got {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype)


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """||a_i - b_j||^2 for all pairs, [len(a), len(b)], via |a|^2 + |b|^2 - 2 a.b (clamped at 0)."""
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2 * a @ b.T
    return d.clamp_min_(0)


def knn_radii(x: Tensor, ks: tuple[int, ...], block: int = 1024) -> dict[int, Tensor]:
    """Squared distance from every row of x to its k-th nearest other row, for each k in ks."""
    kmax = max(ks)
    if len(x) <= kmax:
        raise ValueError(f"need more than k={kmax} feature vectors for k-NN radii, got {len(x)}")
    out: list[Tensor] = []
    for i in range(0, len(x), block):
        d = squared_distances(x[i : i + block], x)
        # The point itself is at distance 0, the smallest: the (k+1)-th smallest is the k-th other one
        # (duplicates of the point also sit at 0 and count as neighbours, as in the reference code).
        out.append(d.topk(kmax + 1, dim=1, largest=False).values)
    nearest = torch.cat(out)
    return {k: nearest[:, k] for k in ks}


def prdc(
    real: np.ndarray | Tensor,
    fake: np.ndarray | Tensor,
    k_pr: int = 3,
    k_dc: int = 5,
    *,
    block: int = 1024,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Precision and recall (k-NN radii with k_pr) and density and coverage (k_dc) of fake vs real."""
    if k_pr < 1 or k_dc < 1:
        raise ValueError(f"k must be >= 1, got k_pr={k_pr}, k_dc={k_dc}")
    dev = torch.device(device) if device is not None else None
    x = _as_tensor(real, dtype, dev)
    y = _as_tensor(fake, dtype, dev)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: real {x.shape[1]}, fake {y.shape[1]}")
    real_r = knn_radii(x, (k_pr, k_dc), block)
    fake_r = knn_radii(y, (k_pr,), block)[k_pr]
    in_real_pr = torch.zeros(len(y), dtype=torch.bool, device=x.device)  # precision, per fake point
    in_real_dc = torch.zeros(len(y), dtype=torch.float64, device=x.device)  # density, per fake point
    nearest_fake = torch.full((len(x),), float("inf"), dtype=dtype, device=x.device)  # coverage, per real
    in_fake = torch.zeros(len(x), dtype=torch.bool, device=x.device)  # recall, per real point
    for j in range(0, len(y), block):
        d = squared_distances(y[j : j + block], x)  # [b, N]: fake rows, real columns
        in_real_pr[j : j + block] = (d <= real_r[k_pr][None]).any(1)
        in_real_dc[j : j + block] = (d <= real_r[k_dc][None]).sum(1).double()
        nearest_fake = torch.minimum(nearest_fake, d.min(0).values)
        in_fake |= (d <= fake_r[j : j + block, None]).any(0)
    return {
        "precision": float(in_real_pr.double().mean()),
        "recall": float(in_fake.double().mean()),
        "density": float(in_real_dc.sum() / (k_dc * len(y))),
        "coverage": float((nearest_fake <= real_r[k_dc]).double().mean()),
        "k_pr": k_pr,
        "k_dc": k_dc,
        "num_real": len(x),
        "num_fake": len(y),
    }


def expected_coverage(num_real: int, num_fake: int, k: int) -> float:
    """E[coverage] when real and fake points are i.i.d. from one continuous distribution.

    A real point's ball is missed iff its k nearest neighbours among the other N-1 real and the M fake
    points (all exchangeable) are all real: 1 - prod_{j=1..k} (N-j) / (N-j+M), whatever the dimension.
    """
    p = 1.0
    for j in range(1, k + 1):
        p *= (num_real - j) / (num_real - j + num_fake)
    return 1.0 - p
