"""Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel.

k(x, y) = (x.y / D + 1)^3 on D-dimensional features. The unbiased estimator on subsets of size m is
    MMD^2 = [sum_{i!=j} k(x_i,x_j) + sum_{i!=j} k(y_i,y_j)] / (m(m-1)) - 2 sum_{i,j} k(x_i,y_j) / m^2,
averaged over `num_subsets` random subsets (drawn without replacement within a subset, seeded), as in
the reference implementation. Reported: mean and standard deviation over subsets.
"""

from __future__ import annotations

import numpy as np
import torch


def polynomial_kernel(
    x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: float | None = None, coef0: float = 1.0
) -> torch.Tensor:
    """(gamma x.y + coef0)^degree for all pairs; gamma defaults to 1/D."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * x @ y.T + coef0) ** degree


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int = 3) -> float:
    """Unbiased MMD^2 between two equally sized feature sets [m, D] under the polynomial kernel."""
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"need two sets of equal size >= 2, got {x.shape[0]} and {y.shape[0]}")
    kxx, kyy, kxy = (
        polynomial_kernel(x, x, degree),
        polynomial_kernel(y, y, degree),
        polynomial_kernel(x, y, degree),
    )
    sum_xx = kxx.sum() - kxx.diagonal().sum()
    sum_yy = kyy.sum() - kyy.diagonal().sum()
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * kxy.sum() / m**2)


def kernel_inception_distance(
    features1: np.ndarray | torch.Tensor,
    features2: np.ndarray | torch.Tensor,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """KID between two feature sets: mean and std of unbiased MMD^2 over random subsets.

    The subset size is capped at the smaller set's size (and reported).
    """
    f1 = torch.as_tensor(np.asarray(features1), dtype=torch.float64)
    f2 = torch.as_tensor(np.asarray(features2), dtype=torch.float64)
    m = min(subset_size, f1.shape[0], f2.shape[0])
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        i = torch.randperm(f1.shape[0], generator=gen)[:m]
        j = torch.randperm(f2.shape[0], generator=gen)[:m]
        values.append(mmd2_unbiased(f1[i], f2[j]))
    v = np.asarray(values)
    return {"mean": float(v.mean()), "std": float(v.std()), "subset_size": m, "num_subsets": num_subsets}
