"""DCGAN generator and discriminator (Radford et al. 2016), for any image size that halves to 3..7.

Plain single-device `nn.Module`s. The architecture guidelines of Radford et al. (sec. 3): strided
convolutions instead of pooling, fractionally-strided (transposed) convolutions in the generator,
batch normalization in both networks except the generator output and the discriminator input layers,
ReLU in the generator with Tanh at the output, LeakyReLU(0.2) in the discriminator, no fully
connected hidden layers. Weights start from N(0, 0.02) (sec. 4).

Resolution: the generator projects z to an s0 x s0 map and doubles it `n` times, where n is the most
halvings of the image size that leave s0 >= `min_resolution` (32 -> 4 with 3 stages, 28 -> 7 with 2,
8 -> 4 with 1). Channel widths double as the resolution halves, as in the paper's 64x64 model
(1024 channels at 4x4 with `base_channels` = 128).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def num_stages(size: int, min_resolution: int = 4) -> int:
    """Stride-2 stages between `size` and the smallest map: halve while even and >= 2 * min_resolution."""
    n, s = 0, size
    while s % 2 == 0 and s // 2 >= min_resolution:
        s //= 2
        n += 1
    if n == 0:
        raise ValueError(f"image size {size} cannot be halved to >= {min_resolution}; lower min_resolution")
    return n


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r} (batch or none)")


def dcgan_init(module: nn.Module) -> None:
    """Radford et al. 2016 sec. 4: conv weights ~ N(0, 0.02); BatchNorm scale ~ N(1, 0.02), shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z [B, latent_dim] -> images [B, C, H, W] in (-1, 1)."""

    def __init__(self, latent_dim: int, channels: int, size: int, base_channels: int = 64,
                 norm: str = "batch", min_resolution: int = 4) -> None:
        super().__init__()
        n = num_stages(size, min_resolution)
        s0 = size >> n
        widths = [base_channels * 2 ** (n - 1 - k) for k in range(n)]  # at s0, 2 s0, ..., size / 2
        self.latent_dim = latent_dim
        layers: list[nn.Module] = [  # "project and reshape": a transposed conv on the 1x1 map of z
            nn.ConvTranspose2d(latent_dim, widths[0], s0, 1, 0, bias=norm == "none"),
            _norm2d(norm, widths[0]), nn.ReLU(True),
        ]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=norm == "none"), _norm2d(norm, cout),
                       nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """images [B, C, H, W] in [-1, 1] -> logits [B]; `features(x)` gives the probe features."""

    def __init__(self, channels: int, size: int, base_channels: int = 64, norm: str = "batch",
                 min_resolution: int = 4) -> None:
        super().__init__()
        n = num_stages(size, min_resolution)
        s0 = size >> n
        widths = [base_channels * 2**k for k in range(n)]  # at size / 2, ..., s0
        self.blocks = nn.ModuleList()
        cin = channels
        for k, cout in enumerate(widths):
            # No normalization on the first layer (Radford et al. sec. 3).
            norm_layer = nn.Identity() if k == 0 else _norm2d(norm, cout)
            self.blocks.append(nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1, bias=k == 0 or norm == "none"),
                                             norm_layer, nn.LeakyReLU(0.2, True)))
            cin = cout
        self.head = nn.Conv2d(cin, 1, s0, 1, 0)  # a conv over the whole s0 x s0 map = the final linear layer
        dcgan_init(self)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for block in self.blocks:
            h = block(h)
        return self.head(h).flatten()

    def features(self, x: Tensor, grid: int = 4) -> Tensor:
        """Every layer's activations max-pooled to a grid x grid map, flattened and concatenated [B, D]:
        the feature extractor of Radford et al. 2016 sec. 5.1 (CIFAR-10 classification with an L2-SVM)."""
        feats, h = [], x
        for block in self.blocks:
            h = block(h)
            feats.append(nn.functional.adaptive_max_pool2d(h, min(grid, h.shape[-1])).flatten(1))
        return torch.cat(feats, dim=1)
