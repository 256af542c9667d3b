"""Out-of-distribution detection: AUROC of a score that should be higher in distribution, and the built-in
corruptions of a test set used as out-of-distribution data."""

from __future__ import annotations

import torch
from torch import Tensor

CORRUPTIONS = ("uniform_noise", "pixel_permuted", "inverted")


def auroc(score_in: Tensor, score_out: Tensor) -> float:
    """P(score_in > score_out) + P(tie) / 2 over all (in, out) pairs: the area under the ROC curve with the
    in-distribution examples as positives (Mann-Whitney U from average ranks, so ties count one half)."""
    s = torch.cat([score_in.double().flatten(), score_out.double().flatten()])
    n_in, n_out = score_in.numel(), score_out.numel()
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # Average the ranks of tied values.
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2
    return float(u / (n_in * n_out))


def corrupt(x: Tensor, kind: str, seed: int = 0) -> Tensor:
    """An out-of-distribution copy of uint8 images x [B, C, H, W]: uniform noise (i.i.d. uniform pixels),
    pixel-permuted (one fixed random permutation of the pixel positions, the same for every image: the
    intensity histogram is kept, the spatial structure destroyed) or inverted (255 - x)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform_noise":
        return torch.randint(0, 256, x.shape, generator=g, dtype=torch.int64).to(torch.uint8)
    if kind == "pixel_permuted":
        b, c, h, w = x.shape
        perm = torch.randperm(h * w, generator=g)
        return x.reshape(b, c, h * w)[:, :, perm].reshape(b, c, h, w)
    if kind == "inverted":
        return 255 - x
    raise ValueError(f"unknown corruption {kind!r}; one of {', '.join(CORRUPTIONS)}")


def match_images(x: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """uint8 images [B, C, H, W] of another dataset brought to `shape` (C, H, W), so a model can score them:
    grey -> colour by repeating the channel, colour -> grey by the mean of the channels, then an
    antialiased bilinear resize when the size differs."""
    c, h, w = shape
    v = x.float()
    if v.shape[1] != c:
        v = v.mean(1, keepdim=True) if c == 1 else v.mean(1, keepdim=True).expand(-1, c, -1, -1)
    if tuple(v.shape[2:]) != (h, w):
        v = torch.nn.functional.interpolate(v, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return v.round().clamp(0, 255).to(torch.uint8)
