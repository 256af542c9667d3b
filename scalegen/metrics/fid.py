"""Frechet distance between Gaussians fitted to features (FID when the features are Inception pool3).

FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})   (Heusel et al. 2017, eq. 6).

The matrix square root is `scipy.linalg.sqrtm` in float64. As in the reference implementations, a
product that is numerically singular (non-finite square root) is retried with `eps` added to both
diagonals, and a complex result whose diagonal has imaginary parts below `imag_tol` (round-off)
keeps its real part; larger imaginary parts raise, since then the statistics are broken.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (ddof=1) of features [N, D], in float64."""
    f = (
        features.detach().cpu().double().numpy()
        if isinstance(features, torch.Tensor)
        else np.asarray(features)
    )
    f = f.astype(np.float64, copy=False)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape [N>=2, D], got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    imag_tol: float = 1e-3,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"singular covariance product in the Frechet distance; adding {eps} to the diagonals",
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if max_imag > imag_tol:
            raise ValueError(
                f"matrix square root has an imaginary component of {max_imag:.3g} (> {imag_tol})"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
