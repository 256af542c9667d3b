"""PixelCNN (van den Oord et al. 2016a) and Gated PixelCNN (van den Oord et al. 2016b).

Both model p(x) = prod_i p(x_i | x_<i) in raster order (rows top to bottom, pixels left to right,
and within a pixel the colour channels R, G, B in order, as in 2016a Sec. 3.4).

Colour ordering: every feature map of `n` channels is split into C groups by `channel % C`
(interleaved, so the tanh / sigmoid halves of a gate keep their groups). At the current pixel, a
feature of group g may read inputs of groups < g (mask type "A", the first layer) or <= g (type
"B", every later layer). The output logits are laid out [B, K, C, H, W], K = levels (256-way
softmax) or 1 (Bernoulli logit for binary data).

Inputs are integer images in {0..levels-1} (uint8 for 8-bit data, {0,1} for binary data).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _group_mask(out_ch: int, in_ch: int, groups: int, mask_type: str) -> Tensor:
    """[out, in] bool: may output channel o read input channel i at the same pixel?"""
    go = torch.arange(out_ch).view(-1, 1) % groups
    gi = torch.arange(in_ch).view(1, -1) % groups
    return gi < go if mask_type == "A" else gi <= go


class MaskedConv2d(nn.Conv2d):
    """k x k convolution that only sees pixels above, to the left, and the allowed groups of the centre.

    mask_type "A" (first layer) excludes the centre pixel's own channel group; "B" includes it
    (van den Oord et al. 2016a Fig. 2). groups = colour channels of the data.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, mask_type: str, groups: int = 1) -> None:
        if kernel_size % 2 != 1 or mask_type not in ("A", "B"):
            raise ValueError("kernel_size must be odd and mask_type 'A' or 'B'")
        super().__init__(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
        k, c = kernel_size, kernel_size // 2
        mask = torch.zeros(out_ch, in_ch, k, k)
        mask[:, :, :c, :] = 1  # rows above
        mask[:, :, c, :c] = 1  # left in the current row
        mask[:, :, c, c] = _group_mask(out_ch, in_ch, groups, mask_type).float()
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class _Conditioning(nn.Module):
    """Class label -> per-layer bias. Label -1 (unlabelled) maps to its own learned embedding."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Tensor) -> Tensor:
        y = torch.where(y < 0, torch.full_like(y, self.num_classes), y)
        return self.embed(y)


def _scale_input(x: Tensor, levels: int, dtype: torch.dtype) -> Tensor:
    """Integer levels -> floats in [-1, 1] (the network's input; the targets stay integer)."""
    return x.to(dtype) * (2.0 / (levels - 1)) - 1.0


class _OutputHead(nn.Module):
    """ReLU - 1x1 (B) - ReLU - 1x1 (B) -> [B, K, C, H, W] logits (2016a Table 1, last rows)."""

    def __init__(self, ch: int, hidden: int, data_channels: int, k: int) -> None:
        super().__init__()
        self.c, self.k = data_channels, k
        self.fc1 = MaskedConv2d(ch, hidden, 1, "B", data_channels)
        self.fc2 = MaskedConv2d(hidden, k * data_channels, 1, "B", data_channels)

    def forward(self, h: Tensor) -> Tensor:
        out = self.fc2(F.relu(self.fc1(F.relu(h))))
        b, _, hh, ww = out.shape
        return out.view(b, self.k, self.c, hh, ww)  # channel k*C + c -> (k, c): group c = c


class PixelCNN(nn.Module):
    """Masked-convolution PixelCNN with residual blocks (van den Oord et al. 2016a, Sec. 3.5 / Fig. 5).

    Has the well-known blind spot: its receptive field misses pixels up and to the right.
    """

    def __init__(self, data_channels: int = 1, levels: int = 256, hidden: int = 128, num_layers: int = 15,
                 kernel_size: int = 3, first_kernel_size: int = 7, out_hidden: int = 1024,
                 num_classes: int = 0, binary: bool = False) -> None:
        super().__init__()
        c = data_channels
        if hidden % c:
            raise ValueError(f"hidden={hidden} must be a multiple of the {c} colour channels")
        self.data_channels, self.levels, self.binary = c, 2 if binary else levels, binary
        h2 = 2 * hidden
        self.first = MaskedConv2d(c, h2, first_kernel_size, "A", c)
        self.blocks = nn.ModuleList(
            nn.ModuleList([
                MaskedConv2d(h2, hidden, 1, "B", c),
                MaskedConv2d(hidden, hidden, kernel_size, "B", c),
                MaskedConv2d(hidden, h2, 1, "B", c),
            ]) for _ in range(num_layers)
        )
        self.cond = _Conditioning(num_classes, h2 * num_layers) if num_classes > 0 else None
        self.head = _OutputHead(h2, out_hidden - out_hidden % c or c, c, 1 if binary else levels)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Integer image [B, C, H, W] -> logits [B, K, C, H, W]."""
        return self.forward_float(_scale_input(x, self.levels, self.first.weight.dtype), y)

    def forward_float(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The same on the scaled real-valued input in [-1, 1] (differentiable: causality tests)."""
        h = self.first(x)
        biases = None
        if self.cond is not None and y is not None:
            biases = self.cond(y).view(len(y), len(self.blocks), -1, 1, 1)
        for i, (a, b, c) in enumerate(self.blocks):
            inp = h if biases is None else h + biases[:, i]
            h = h + c(F.relu(b(F.relu(a(F.relu(inp))))))  # residual block, 2016a Fig. 5
        return self.head(h)


class GatedLayer(nn.Module):
    """One Gated PixelCNN layer: a vertical and a horizontal stack (van den Oord et al. 2016b Fig. 2).

    Vertical stack: a (k//2 + 1) x k convolution over the rows above and the current row. Its
    pre-activation reaches the horizontal stack only after a one-row down shift, so the horizontal
    stack sees rows strictly above -- which, with a 1 x (k//2 + 1) horizontal convolution over the
    pixels to the left, removes the blind spot. Gate: tanh(W_f * x + V_f h) * sigmoid(W_g * x + V_g h)
    (2016b Eq. 2-4); the horizontal stack has a residual connection after a 1x1 convolution.
    """

    def __init__(self, in_ch: int, ch: int, kernel_size: int, data_channels: int, mask_type: str,
                 cond_dim: int = 0) -> None:
        super().__init__()
        p = kernel_size // 2
        self.p, self.ch, self.residual = p, ch, mask_type == "B"
        self.v_conv = nn.Conv2d(in_ch, 2 * ch, (p + 1, kernel_size))
        self.h_conv = nn.Conv2d(in_ch, 2 * ch, (1, p + 1))
        hmask = torch.ones(2 * ch, in_ch, 1, p + 1)
        hmask[:, :, 0, p] = _group_mask(2 * ch, in_ch, data_channels, mask_type).float()  # current pixel
        self.register_buffer("h_mask", hmask)
        self.v_to_h = nn.Conv2d(2 * ch, 2 * ch, 1)
        self.h_out = MaskedConv2d(ch, ch, 1, "B", data_channels)
        self.cond = nn.Linear(cond_dim, 2 * ch, bias=False) if cond_dim else None

    @staticmethod
    def _gate(a: Tensor) -> Tensor:
        f, g = a.chunk(2, 1)
        return torch.tanh(f) * torch.sigmoid(g)

    def forward(self, v: Tensor, h: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = self.p
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0)))  # output row r sees input rows r-p..r
        h_pre = F.conv2d(F.pad(h, (p, 0, 0, 0)), self.h_conv.weight * self.h_mask, self.h_conv.bias)
        v_down = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]  # shift down one row: strictly above
        h_pre = h_pre + self.v_to_h(v_down)
        if self.cond is not None and cond is not None:
            bias = self.cond(cond)[:, :, None, None]
            v_pre, h_pre = v_pre + bias, h_pre + bias
        v_out = self._gate(v_pre)
        h_out = self.h_out(self._gate(h_pre))
        return v_out, (h + h_out if self.residual else h_out)


class GatedPixelCNN(nn.Module):
    """Gated PixelCNN without blind spot (van den Oord et al. 2016b), optionally class-conditional."""

    def __init__(self, data_channels: int = 1, levels: int = 256, hidden: int = 128, num_layers: int = 15,
                 kernel_size: int = 5, first_kernel_size: int = 7, out_hidden: int = 1024,
                 num_classes: int = 0, binary: bool = False) -> None:
        super().__init__()
        c = data_channels
        if hidden % c:
            raise ValueError(f"hidden={hidden} must be a multiple of the {c} colour channels")
        self.data_channels, self.levels, self.binary = c, 2 if binary else levels, binary
        self.kernel_size, self.first_kernel_size = kernel_size, first_kernel_size
        cond_dim = hidden if num_classes > 0 else 0
        self.cond = _Conditioning(num_classes, hidden) if num_classes > 0 else None
        self.layers = nn.ModuleList(
            [GatedLayer(c, hidden, first_kernel_size, c, "A", cond_dim)]
            + [GatedLayer(hidden, hidden, kernel_size, c, "B", cond_dim) for _ in range(num_layers - 1)]
        )
        self.head = _OutputHead(hidden, out_hidden - out_hidden % c or c, c, 1 if binary else levels)

    def receptive_field(self, r: int, col: int, height: int, width: int) -> set[tuple[int, int]]:
        """Pixels (row, col) that output (r, col) depends on: rows r-1-reach..r-1 within +-reach columns,
        and up to `reach` pixels to the left in row r (reach = sum of k//2 over layers); image-clipped."""
        reach = self.first_kernel_size // 2 + (len(self.layers) - 1) * (self.kernel_size // 2)
        cols = range(max(0, col - reach), min(width, col + reach + 1))
        out = {(rr, cc) for rr in range(max(0, r - 1 - reach), r) for cc in cols}
        out |= {(r, cc) for cc in range(max(0, col - reach), col)}
        return out

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Integer image [B, C, H, W] -> logits [B, K, C, H, W]."""
        return self.forward_float(_scale_input(x, self.levels, self.head.fc1.weight.dtype), y)

    def forward_float(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The same on the scaled real-valued input in [-1, 1] (differentiable: causality tests)."""
        v = h = x
        cond = self.cond(y) if self.cond is not None and y is not None else None
        for layer in self.layers:
            v, h = layer(v, h, cond)
        return self.head(h)
