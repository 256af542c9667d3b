"""LAPGAN networks (Denton et al. 2015): a Laplacian pyramid of generators and one discriminator per level.

Plain single-device modules. Level 0 is a DCGAN generator from z to the coarse image; level k >= 1
is a conditional convnet G_k(l_k, z_k) -> h_k that generates the band-pass residual of its level
given l_k, the upsampled image of the level below, with its noise z_k as an extra input plane (their
CIFAR-10 models, sec. 4); the level's image is l_k + h_k. Residuals are projected onto the pyramid's
band (`scalegen.nets.pyramid.band`), so the Laplacian pyramid of a generated image is exactly the
generator's own levels. The discriminator decomposes any image into its pyramid and scores every
level: D_0 the coarse image, D_k the pair (l_k, h_k), returning logits [B, levels].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scalegen.nets.dcgan import Discriminator, Generator, dcgan_init
from scalegen.nets.pyramid import band, decompose, up


class LevelGenerator(nn.Module):
    """(l [B, C, H, W], noise [B, 1, H, W]) -> residual h [B, C, H, W] (band-pass)."""

    def __init__(self, channels: int, width: int, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels + 1, width, 3, 1, 1), nn.ReLU(True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(True)]
        layers.append(nn.Conv2d(width, channels, 3, 1, 1))
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, low: Tensor, noise: Tensor) -> Tensor:
        return band(self.net(torch.cat([low, noise], 1)))


class PyramidGenerator(nn.Module):
    """z [B, latent_dim] -> images [B, C, H, W]; `levels(z)` gives every level's image, coarse first."""

    def __init__(self, latent_dim: int, channels: int, size: int, levels: int, coarse_channels: int = 64,
                 level_channels: int = 64, level_depth: int = 3, norm: str = "batch",
                 min_resolution: int = 4) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.coarse = Generator(latent_dim, channels, size >> (levels - 1), coarse_channels, norm, min_resolution)
        self.refine = nn.ModuleList(LevelGenerator(channels, level_channels, level_depth) for _ in range(levels - 1))

    def levels(self, z: Tensor) -> list[Tensor]:
        images = [self.coarse(z)]
        for g in self.refine:
            low = up(images[-1])
            noise = torch.randn(low.shape[0], 1, *low.shape[2:], device=low.device, dtype=low.dtype)
            images.append(low + g(low, noise))
        return images

    def forward(self, z: Tensor) -> Tensor:
        return self.levels(z)[-1]


class PyramidDiscriminator(nn.Module):
    """images [B, C, H, W] -> logits [B, levels]: D_0(coarse), D_k(cat(l_k, h_k)) for k >= 1."""

    def __init__(self, channels: int, size: int, levels: int, base_channels: int = 64, norm: str = "batch",
                 min_resolution: int = 4) -> None:
        super().__init__()
        self.num_levels = levels
        coarse = size >> (levels - 1)
        self.coarse = Discriminator(channels, coarse, base_channels, norm, min_resolution)
        self.refine = nn.ModuleList(
            Discriminator(2 * channels, coarse << k, base_channels, norm, min_resolution) for k in range(1, levels)
        )

    def _inputs(self, x: Tensor) -> list[Tensor]:
        coarse, residuals = decompose(x, self.num_levels)
        inputs, image = [coarse], coarse
        for h in residuals:
            low = up(image)
            inputs.append(torch.cat([low, h], 1))
            image = low + h
        return inputs

    def forward(self, x: Tensor) -> Tensor:
        nets = [self.coarse, *self.refine]
        return torch.stack([d(v) for d, v in zip(nets, self._inputs(x))], 1)

    def features(self, x: Tensor, grid: int = 4) -> Tensor:
        """Every level discriminator's pooled features (`Discriminator.features`), concatenated [B, D]."""
        nets = [self.coarse, *self.refine]
        return torch.cat([d.features(v, grid) for d, v in zip(nets, self._inputs(x))], 1)
