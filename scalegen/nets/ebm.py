"""Convolutional networks for energy-based models: x -> out_dim values (1 = an energy E(x); C = classifier
logits f(x), JEM's E(x) = -logsumexp f(x)). Smooth activations (SiLU), so Langevin's x-gradients are
well behaved; optional spectral normalization of every layer (Miyato et al. 2018), as IGEBM uses."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


class EnergyCNN(nn.Module):
    """Per stage: a 3x3 conv and a stride-2 3x3 conv, SiLU after each; then global sum pooling and a
    linear map to `out_dim` (sum pooling keeps the energy's scale proportional to the image size)."""

    def __init__(self, in_channels: int, widths: Sequence[int], out_dim: int = 1, use_spectral_norm: bool = False,
                 ) -> None:
        super().__init__()
        wrap = spectral_norm if use_spectral_norm else (lambda m: m)
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [wrap(nn.Conv2d(c, w, 3, padding=1)), nn.SiLU(),
                       wrap(nn.Conv2d(w, w, 3, stride=2, padding=1)), nn.SiLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = wrap(nn.Linear(c, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).sum((2, 3)))
