"""Laplacian pyramids of images (Burt & Adelson 1983) as pure functions, for LAPGAN (Denton et al. 2015).

down(x) is 2x2 average pooling and up(x) nearest-neighbour doubling, so down(up(x)) = x exactly, and
the band-pass residual h = x - up(down(x)) of every level has down(h) = 0 (each 2x2 block's mean is
removed). A pyramid of `levels` levels is (coarse, [h_1, ..., h_{levels-1}]), residuals from coarse
to fine; `reconstruct` runs x_k = up(x_{k-1}) + h_k from the coarse image. The two are exact inverses:
reconstruct(decompose(x)) = x for any image whose size halves levels - 1 times, and
decompose(reconstruct(c, hs)) = (c, hs) for residuals in the band (down(h) = 0; `band` projects onto it).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def down(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, C, H/2, W/2]: the mean of each 2x2 block."""
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"a pyramid level needs even sizes, got {tuple(x.shape[-2:])}")
    return F.avg_pool2d(x, 2)


def up(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, C, 2H, 2W]: each value repeated over a 2x2 block."""
    return x.repeat_interleave(2, -2).repeat_interleave(2, -1)


def band(h: Tensor) -> Tensor:
    """The band-pass part of a residual: h - up(down(h)) (its 2x2 block means removed)."""
    return h - up(down(h))


def decompose(x: Tensor, levels: int) -> tuple[Tensor, list[Tensor]]:
    """x -> (coarse image of size H / 2^(levels-1), residuals coarse to fine)."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    residuals = []
    for _ in range(levels - 1):
        low = down(x)
        residuals.append(x - up(low))
        x = low
    return x, residuals[::-1]


def reconstruct(coarse: Tensor, residuals: list[Tensor]) -> Tensor:
    """(coarse, residuals coarse to fine) -> the image: x_k = up(x_{k-1}) + h_k."""
    x = coarse
    for h in residuals:
        x = up(x) + h
    return x
