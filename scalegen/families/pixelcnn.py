"""Autoregressive image models: PixelCNN (van den Oord et al. 2016a) and Gated PixelCNN (2016b).

Exact likelihood p(x) = prod_i p(x_i | x_<i) over pixels in raster order and colour channels in
R, G, B order; a 256-way softmax per sub-pixel (nats of the 8-bit data) or a Bernoulli per pixel
on binarized data (nats of the binarized data). Optional class conditioning; ancestral sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from scalegen.config.schema import ModelConfig, OptimConfig, choice, ranged
from scalegen.dataspec import DataSpec
from scalegen.errors import UserError
from scalegen.families.base import GenerativeModel, recipe_shapes
from scalegen.nets.pixelcnn import GatedPixelCNN, PixelCNN
from scalegen.objectives.autoregressive import autoregressive_nll, binarize
from scalegen.registry import register_family
from scalegen.samplers.autoregressive import sample_image
from scalegen.samplers.completion import complete_autoregressive, paste


@dataclass
class PixelCNNConfig(ModelConfig):
    family: str = "pixelcnn"
    architecture: str = choice("gated", "pixelcnn")  # Gated PixelCNN (2016b, no blind spot) or PixelCNN
    output: str = choice("softmax", "binary")  # 256-way softmax per sub-pixel, or Bernoulli
    binarize_threshold: int = ranged(128, ge=1, le=255)  # output=binary: pixel -> 1 if value >= threshold (static)
    hidden_channels: int = ranged(128, ge=1)  # feature maps per layer (a multiple of the image channels); 2016a: 2h=256
    num_layers: int = ranged(15, ge=1)  # gated layers / residual blocks after the first masked convolution
    kernel_size: int = ranged(3, ge=1)  # kernel n of later layers (gated: n x n vertical, 1 x n//2+1 horizontal)
    first_kernel_size: int = ranged(7, ge=1)  # kernel of the first, type-A masked layer
    out_hidden_channels: int = ranged(1024, ge=1)  # channels of the 1x1 output head before the logits
    conditional: bool = False  # class-conditional p(x | y) (2016b Eq. 4): label embedding biases every layer
    temperature: float = ranged(1.0, ge=0)  # default sampling temperature (softmax logits / T; 0 = argmax)


@register_family("pixelcnn", PixelCNNConfig, "PixelCNN / Gated PixelCNN: exact bits/dim, ancestral sampling")
class PixelCNNModel(GenerativeModel):
    """PixelCNN and Gated PixelCNN over 8-bit or binarized images."""

    nll_kind = "exact"
    predictions = frozenset({"nll", "sample", "complete"})

    def __init__(self, cfg: PixelCNNConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        if data.kind != "image" or len(data.shape) != 3:
            raise UserError(f"the pixelcnn family models images [C, H, W], not {data.kind} {data.shape}")
        if cfg.conditional and data.num_classes <= 0:
            raise UserError("model.conditional=true needs a labelled dataset (data spec has no classes)")
        c = int(data.shape[0])
        if cfg.hidden_channels % c:
            raise UserError(f"model.hidden_channels={cfg.hidden_channels} must be a multiple of {c} channels")
        net_cls = GatedPixelCNN if cfg.architecture == "gated" else PixelCNN
        with recipe_shapes(self.family_name):
            self.net = net_cls(
                data_channels=c, levels=256, hidden=cfg.hidden_channels, num_layers=cfg.num_layers,
                kernel_size=cfg.kernel_size, first_kernel_size=cfg.first_kernel_size,
                out_hidden=cfg.out_hidden_channels, num_classes=data.num_classes if cfg.conditional else 0,
                binary=cfg.output == "binary",
            )

    def _target(self, x: Tensor) -> Tensor:
        """The discrete data the model is a distribution over: 8-bit values, or {0, 1} when binary."""
        return binarize(x, self.cfg.binarize_threshold) if self.cfg.output == "binary" else x

    def _labels(self, y: Tensor | None) -> Tensor | None:
        return y if self.cfg.conditional else None

    def nll(self, x: Tensor, y: Tensor | None = None, k: int | None = None) -> Tensor:
        """Exact -log p(x [| y]) in nats: one teacher-forced pass gives every conditional."""
        target = self._target(x)
        return autoregressive_nll(self.net(target, self._labels(y)), target)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        nll = self.nll(batch["x"], batch.get("y"))
        bpd = nll.mean() / (self.data_spec.dims * math.log(2))
        return bpd, {"bpd": bpd.detach()}

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, temperature: float | None = None) -> Tensor:
        """n uint8 images; conditional models draw classes 0, 1, 2, ... when y is None. Binary -> {0, 255}."""
        if self.cfg.conditional and y is None:
            y = torch.arange(n, device=self.device) % self.data_spec.num_classes
        t = self.cfg.temperature if temperature is None else temperature
        shape = tuple(int(s) for s in self.data_spec.shape)
        x = sample_image(self.net, shape, n, self._labels(y), t)  # type: ignore[arg-type]
        return x * 255 if self.cfg.output == "binary" else x

    @property
    def num_labels(self) -> int:
        """Classes the model is conditioned on (0: unconditional)."""
        return self.data_spec.num_classes if self.cfg.conditional else 0

    @torch.no_grad()
    def complete(self, x: Tensor, observed: Tensor, y: Tensor | None = None,
                 temperature: float | None = None) -> Tensor:
        """x (uint8) with its unobserved values (`observed` False; broadcast to x's shape) drawn by the
        model: raster-order sampling given every observed value, exact p(x_missing | x_observed) when the
        missing values follow all observed ones (e.g. the bottom half); see `scalegen.samplers.completion`."""
        if self.cfg.conditional and y is None:
            raise UserError("this PixelCNN is class-conditional: give the images' classes (--class)")
        t = self.cfg.temperature if temperature is None else temperature
        x, m = x.to(self.device), observed.to(self.device).expand_as(x)
        y = None if y is None else y.to(self.device)
        out = complete_autoregressive(self.net, self._target(x), m, self._labels(y), t)
        return paste(x, out * 255 if self.cfg.output == "binary" else out, m)
