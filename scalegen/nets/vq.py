"""Vector quantization (van den Oord et al. 2017, "Neural Discrete Representation Learning") and the
convolutional encoder / decoder that keep a spatial latent map.

`VectorQuantizer` holds the codebook of K vectors and its running statistics as buffers. It never
calls collectives: a family that trains on several ranks reduces the assignment statistics
(`assignment_statistics`) across ranks itself and passes the totals to `ema_update` / `track_usage`,
and picks the restart vectors identically on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scalegen.nets.conv import stage_sizes
from scalegen.nets.init_flag import DataInitFlag


def nearest_codes(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook vector (squared Euclidean distance) for each row: z [N, D] -> [N]."""
    d = (z * z).sum(1, keepdim=True) - 2 * z @ codebook.t() + (codebook * codebook).sum(1)
    return d.argmin(1)


def straight_through(z_e: Tensor, z_q: Tensor) -> Tensor:
    """z_q in the forward pass, identity gradient to z_e in the backward pass (2017 Eq. 3's sg trick).

    Written z_q + (z_e - sg(z_e)) rather than z_e + sg(z_q - z_e): the added term is exactly 0, so the
    decoder sees z_q bit for bit."""
    return z_q + (z_e - z_e.detach())


def assignment_statistics(z: Tensor, codes: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """(n_k [K] vectors assigned to each code, s_k [K, D] their sum) for z [N, D] and codes [N]."""
    # By comparison, not F.one_hot, whose range check reads the codes on the host in every call.
    onehot = (codes.unsqueeze(1) == torch.arange(num_codes, device=codes.device)).to(z.dtype)
    return onehot.sum(0), onehot.t() @ z


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of the code frequencies: K when every code is used equally, 1 when one code is."""
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


class VectorQuantizer(DataInitFlag):
    """A codebook of `num_codes` vectors of size `dim`, learned by the codebook loss or by EMA.

    ema=True (2017 Appendix A.1): N_k <- g N_k + (1-g) n_k, m_k <- g m_k + (1-g) s_k, e_k = m_k / N~_k with
    N~_k = (N_k + eps) / (sum N + K eps) * sum N (Laplace smoothing keeps unused codes finite; eps = 0
    is the plain mean). ema=False: the codebook is a parameter trained by ||sg(z_e) - e||^2.
    `count` (the EMA of n_k, kept in both modes) finds dead codes for `restart`.
    """

    def __init__(self, num_codes: int, dim: int, ema: bool = True, decay: float = 0.99, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_codes, self.dim, self.ema, self.decay, self.eps = num_codes, dim, ema, decay, eps
        init = torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes)  # as in the 2017 code
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_sum", init.clone())  # m_k, consistent with N_k = 1 at the start
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("count", torch.ones(num_codes))  # N_k: EMA of assignments per update
        # `initialized` (DataInitFlag) is False until the family has set the codebook from encoder outputs.

    def quantize(self, z_e: Tensor) -> tuple[Tensor, Tensor]:
        """(codes [B, H, W], z_q [B, D, H, W]) for an encoder map z_e [B, D, H, W]; z_q has the codebook's
        gradient (loss mode) and none to z_e."""
        b, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        codes = nearest_codes(flat.detach(), self.codebook.detach()).view(b, h, w)
        return codes, self.lookup(codes)

    def lookup(self, codes: Tensor) -> Tensor:
        """Codebook vectors of integer codes [B, H, W] -> [B, D, H, W]."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    @torch.no_grad()
    def track_usage(self, counts: Tensor) -> None:
        """count <- decay count + (1 - decay) n_k (the loss mode's only statistic)."""
        self.count.mul_(self.decay).add_(counts.to(self.count.dtype), alpha=1 - self.decay)

    @torch.no_grad()
    def ema_update(self, counts: Tensor, sums: Tensor) -> None:
        """One EMA step of the codebook from this step's (global) assignment statistics (n_k, s_k)."""
        self.track_usage(counts)
        self.ema_sum.mul_(self.decay).add_(sums.to(self.ema_sum.dtype), alpha=1 - self.decay)
        n = self.count.sum()
        smoothed = (self.count + self.eps) / (n + self.num_codes * self.eps) * n
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))

    def dead_codes(self, threshold: float) -> Tensor:
        """Bool [K]: codes whose running assignment count fell below `threshold` per update."""
        return self.count < threshold

    @torch.no_grad()
    def restart(self, dead: Tensor, candidates: Tensor) -> None:
        """Move each dead code k (`dead` bool [K]) onto candidates[k] (candidates [K, D], or [1, D] for all, encoder
        outputs: Dhariwal et al. 2020; Zeghidour et al. 2021) and give it a count of 1, so it is not
        restarted again at once. Masked writes, not indexing by the dead codes, which would read how many
        there are on the host."""
        rows = dead.unsqueeze(1)
        self.codebook.copy_(torch.where(rows, candidates.to(self.codebook.dtype), self.codebook))
        self.count.copy_(torch.where(dead, 1.0, self.count))
        if self.ema:
            self.ema_sum.copy_(torch.where(rows, candidates.to(self.ema_sum.dtype), self.ema_sum))
        self.mark_initialized()


class ResBlock(nn.Module):
    """ReLU, 3x3 conv, ReLU, 1x1 conv, added to the input (2017 Sec. 4.1)."""

    def __init__(self, ch: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class VQEncoder(nn.Module):
    """Stride-2 conv stages (channels `widths`), residual blocks, 1x1 conv to the code dimension."""

    def __init__(self, in_channels: int, widths: Sequence[int], res_blocks: int, dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1)] + ([nn.ReLU()] if i + 1 < len(widths) else [])
            c = w
        layers += [ResBlock(c, max(c // 2, 1)) for _ in range(res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(c, dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class VQDecoder(nn.Module):
    """Mirror of VQEncoder: 3x3 conv from the code dimension, residual blocks, (upsample, conv) stages back
    to `size` (H, W) (odd sizes such as 28 -> 14 -> 7, and non-square ones, included), a last conv to
    `out_channels`."""

    def __init__(self, dim: int, widths: Sequence[int], res_blocks: int, out_channels: int,
                 size: tuple[int, int]) -> None:
        super().__init__()
        widths = list(reversed(widths))
        sizes = list(reversed(stage_sizes(size, len(widths))))  # small -> large
        layers: list[nn.Module] = [nn.Conv2d(dim, widths[0], 3, padding=1)]
        layers += [ResBlock(widths[0], max(widths[0] // 2, 1)) for _ in range(res_blocks)]
        for i, w in enumerate(widths):
            nxt = widths[i + 1] if i + 1 < len(widths) else widths[-1]
            layers += [nn.ReLU(), nn.Upsample(size=sizes[i + 1]), nn.Conv2d(w, nxt, 3, padding=1)]
        layers += [nn.ReLU(), nn.Conv2d(widths[-1], out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
