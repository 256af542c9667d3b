"""Image and audio transforms on single examples, written here (no torchvision).

Images are uint8 tensors [C, H, W] in and out; audio is float [1, T] in [-1, 1]. Random transforms
take an explicit `torch.Generator`, so the pipeline can make them a function of the sample's
position (reproducible across resumes, worker counts of the same plan, and processes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


# ---- images ----------------------------------------------------------------------------------------
def random_flip(x: Tensor, gen: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror left-right with probability p."""
    return x.flip(-1) if torch.rand((), generator=gen).item() < p else x


def random_crop(x: Tensor, size: tuple[int, int], padding: int, gen: torch.Generator) -> Tensor:
    """Pad by `padding` pixels (reflect) on every side, then crop `size` at a uniformly random offset.

    The padded image is never built: the window's rows and columns are gathered through reflected
    indices (integer indexing, no float round trip), which is what makes per-sample cropping cheap.
    """
    h, w = size
    top = int(torch.randint(0, x.shape[-2] + 2 * padding - h + 1, (), generator=gen)) - padding
    left = int(torch.randint(0, x.shape[-1] + 2 * padding - w + 1, (), generator=gen)) - padding
    rows = _reflect(torch.arange(top, top + h), x.shape[-2])
    cols = _reflect(torch.arange(left, left + w), x.shape[-1])
    return x[..., rows[:, None], cols[None, :]]


def _reflect(i: Tensor, n: int) -> Tensor:
    """Reflect-padding index map (edge not repeated: -1 -> 1, n -> n - 2), periodic for wide pads."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i < n, i, period - i)


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central size x size square (the image must be at least that large)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {h}x{w} to {size}x{size}: set data.resize >= {size}")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """Shape after scaling the shorter side to `size` (aspect ratio kept, rounded)."""
    if h <= w:
        return size, max(1, round(w * size / h))
    return max(1, round(h * size / w)), size


def resize(x: Tensor, size: int) -> Tensor:
    """Scale so the shorter side is `size` pixels: bilinear with antialiasing, rounded back to uint8."""
    h, w = x.shape[-2:]
    out = resized_shape(h, w, size)
    if out == (h, w):
        return x
    y = F.interpolate(x[None].float(), size=out, mode="bilinear", align_corners=False, antialias=True)[0]
    return y.round().clamp(0, 255).to(torch.uint8)


# ---- audio ------------------------------------------------------------------------------------------
def crop_or_pad(x: Tensor, length: int, gen: torch.Generator | None = None) -> Tensor:
    """Fix the last dim to `length`: crop at a random offset (gen given) or at the start; zero-pad the end."""
    t = x.shape[-1]
    if t > length:
        start = int(torch.randint(0, t - length + 1, (), generator=gen)) if gen is not None else 0
        return x[..., start : start + length]
    if t < length:
        return F.pad(x, (0, length - t))
    return x


def mu_law_encode(x: Tensor, levels: int = 256) -> Tensor:
    """Float audio in [-1, 1] -> int64 codes in [0, levels): mu-law companding with mu = levels - 1."""
    mu = levels - 1
    x = x.clamp(-1.0, 1.0)
    f = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    return ((f + 1) / 2 * mu).round().to(torch.int64)


def mu_law_decode(codes: Tensor, levels: int = 256) -> Tensor:
    """Inverse of `mu_law_encode`: int codes -> float audio in [-1, 1]."""
    mu = levels - 1
    f = codes.to(torch.float32) / mu * 2 - 1
    return torch.sign(f) * torch.expm1(f.abs() * math.log1p(mu)) / mu
