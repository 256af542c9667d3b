"""The DDPM UNet (Ho et al. 2020, appendix B; a PixelCNN++-style backbone).

A plain single-device `nn.Module`: `UNet(x, t, y)` maps noisy images x [B, C, H, W], integer
timestep indices t [B] and optional labels y [B] (-1 = unconditional) to a tensor of the same shape
as x (epsilon, v or x0, whatever the objective trains it to predict).

Layout: a sinusoidal timestep embedding (Vaswani et al. 2017, as in Ho et al.) fed through a 2-layer
MLP into every residual block; per resolution level `num_res_blocks` residual blocks (GroupNorm,
SiLU, 3x3 conv, additive time embedding, dropout, zero-initialised last conv), self-attention after
each block at the listed resolutions, a strided-conv downsample between levels, a middle
res-attn-res stage, and the mirrored upsampling path with skip concatenations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps t [B]: float32, or float64 for
    float64 t (a float64 network, e.g. for an exact ODE likelihood)."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _norm(channels: int) -> nn.GroupNorm:
    # Ho et al. use 32 groups (widths >= 64). Narrow debug widths keep >= 2 channels per group: with one
    # channel per group the norm would subtract the per-channel time-embedding shift and erase t.
    return nn.GroupNorm(math.gcd(32, max(1, channels // 2)), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2, self.drop = _norm(cout), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))  # the block starts as the identity
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, zero-initialised output projection."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention over {channels} channels cannot be split into {num_heads} heads")
        self.heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """DDPM UNet. `attn_resolutions` are feature-map sizes (e.g. 16 for CIFAR-10 at 32x32).

    Sizes that do not halve evenly (28 -> 14 -> 7 -> 4) are handled: the upsampling path resizes to
    the matching skip connection's size.
    """

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        num_classes: int = 0,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        ch = base_channels
        temb_dim = 4 * ch
        self.base_channels = ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        # Class conditioning: label embedding added to the time embedding; index num_classes = "no label".
        self.label_emb = nn.Embedding(num_classes + 1, temb_dim) if num_classes > 0 else None
        self.num_classes = num_classes
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(cur, ch * mult, temb_dim, dropout)]
                cur = ch * mult
                if res in attn_resolutions:
                    blocks.append(AttnBlock(cur, num_heads))
                self.down.append(nn.ModuleList(blocks))
                skips.append(cur)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
                res = (res + 1) // 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, temb_dim, dropout), AttnBlock(cur, num_heads),
                                  ResBlock(cur, cur, temb_dim, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(cur + skips.pop(), ch * mult, temb_dim, dropout)]
                cur = ch * mult
                if res in attn_resolutions:
                    blocks.append(AttnBlock(cur, num_heads))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, padding=1)]))  # after nearest upsampling
                res = res * 2
        self.norm_out = _norm(cur)
        self.conv_out = _zero(nn.Conv2d(cur, out_channels or in_channels, 3, padding=1))

    def _temb(self, t: Tensor, y: Tensor | None, batch: int) -> Tensor:
        temb = self.time_mlp(timestep_embedding(t.expand(batch) if t.dim() == 0 else t, self.base_channels))
        if self.label_emb is not None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=temb.device)
            if y is not None:
                labels = torch.where(y >= 0, y, labels)
            temb = temb + self.label_emb(labels)
        return temb

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, return_features: bool = False) -> Tensor:
        temb = self._temb(t, y, x.shape[0])
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            if isinstance(blocks[0], ResBlock):
                h = blocks[0](h, temb)
                for attn in blocks[1:]:
                    h = attn(h)
            else:
                h = blocks[0](h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        if return_features:  # bottleneck activations, global-average-pooled: features for probes
            return h.mean(dim=(2, 3))
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = blocks[0](torch.cat([h, hs.pop()], dim=1), temb)
                for attn in blocks[1:]:
                    h = attn(h)
            else:
                h = blocks[0](F.interpolate(h, size=hs[-1].shape[-2:], mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
