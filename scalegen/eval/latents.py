"""Latent exploration figures for families with an encoder and a decoder into the same latent space.

A family qualifies when it declares "encode" in `predictions` and a `latent_prior` ("gaussian" for
the VAE): then `encode(x, y) -> z` [B, D] and `decode_latent(z, y) -> uint8 images` map between the
images and one latent space. Three grids, each returned as (images, images per row):

- `latent_interpolation`: per pair of test images a row: image a, the decodings of 8 points on the
  path from z_a to z_b, image b. Spherical (slerp, Shoemake 1985; White 2016 "Sampling generative
  networks") when the family's `latent_prior` is "gaussian": a straight line between two typical draws
  of a high-dimensional Gaussian passes through its improbable low-norm centre, the great circle does
  not. Linear otherwise.
- `latent_manifold` when D = 2: the decoder on a 15 x 15 grid of z = Phi^-1(u), u evenly spaced in
  (0, 1) (Kingma & Welling 2014, Fig. 4), so equal areas of the grid carry equal prior mass.
- `latent_labels` for label-conditional models: each test image's latent z (encoded with its own label)
  decoded with every label: the row keeps what the latent holds (style) and varies the class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

Grid = tuple[Tensor, int]  # uint8 images [N, C, H, W], images per row


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation [T, B, D] between rows of a and b [B, D] at fractions t [T]:
    sin((1 - t) w) / sin w a + sin(t w) / sin w b, w the angle between a and b (linear where w ~ 0)."""
    a64, b64 = a.double(), b.double()
    cos = (a64 * b64).sum(1) / (a64.norm(dim=1) * b64.norm(dim=1)).clamp_min(1e-30)
    omega = torch.arccos(cos.clamp(-1, 1))[None, :, None]
    t = t.double()[:, None, None]
    sin = torch.sin(omega)
    straight = sin.abs() < 1e-6
    wa = torch.where(straight, 1 - t, torch.sin((1 - t) * omega) / torch.where(straight, 1.0, sin))
    wb = torch.where(straight, t, torch.sin(t * omega) / torch.where(straight, 1.0, sin))
    return (wa * a64[None] + wb * b64[None]).to(a.dtype)


def lerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Linear interpolation [T, B, D]: (1 - t) a + t b."""
    t = t.to(a.dtype)[:, None, None]
    return (1 - t) * a[None] + t * b[None]


def has_latents(model: Any) -> bool:
    # `latent_prior` is a class-level declaration, like `predictions`; families without one have no figures.
    return "encode" in model.predictions and getattr(type(model), "latent_prior", None) is not None


@torch.no_grad()
def latent_grids(model: Any, x: Tensor, y: Tensor, steps: int = 8, pairs: int = 4) -> dict[str, Grid]:
    """The figures above for the test images x, y (empty when the family has no encoder/decoder pair)."""
    if not has_latents(model) or len(x) < 2:
        return {}
    num_labels = int(getattr(model, "num_labels", 0))  # label-conditional families say how many labels
    labels = y if num_labels else None
    if labels is not None and bool((labels < 0).any()):
        return {}
    grids: dict[str, Grid] = {}
    z = model.encode(x, labels).float()
    k = min(pairs, len(x) // 2)
    t = torch.linspace(0, 1, steps, device=z.device)
    path = (slerp if type(model).latent_prior == "gaussian" else lerp)(z[:k], z[k:2 * k], t)
    row_labels = None if labels is None else labels[:k].repeat(steps)
    decoded = model.decode_latent(path.reshape(steps * k, -1), row_labels).cpu().view(steps, k, *x.shape[1:])
    rows = [torch.cat([x[i:i + 1].cpu(), decoded[:, i], x[k + i:k + i + 1].cpu()]) for i in range(k)]
    grids["latent_interpolation"] = (torch.cat(rows), steps + 2)
    if z.shape[1] == 2:
        u = torch.linspace(0.05, 0.95, 15, device=z.device)
        g = torch.distributions.Normal(0.0, 1.0).icdf(u)
        zz = torch.stack(torch.meshgrid(g, g.flip(0), indexing="xy"), -1).reshape(-1, 2)  # rows: z2 high -> low
        lab = None if labels is None else labels[:1].expand(len(zz))
        grids["latent_manifold"] = (model.decode_latent(zz, lab).cpu(), 15)
    if num_labels:
        n = min(8, len(x))
        every = torch.arange(num_labels, device=z.device)
        decoded = model.decode_latent(z[:n].repeat_interleave(num_labels, 0), every.repeat(n)).cpu()
        rows = [torch.cat([x[i:i + 1].cpu(), decoded[i * num_labels:(i + 1) * num_labels]]) for i in range(n)]
        grids["latent_labels"] = (torch.cat(rows), num_labels + 1)
    return grids
