"""Normalizing flows: RealNVP (Dinh et al. 2017) and Glow (Kingma & Dhariwal 2018).

Every layer is a bijection with a tractable log-determinant:

    forward(x)  -> (z, logdet)   with logdet[b] = log |det dz/dx| for example b
    inverse(z)  -> x

Layers work on images [B, C, H, W] and (where it makes sense) on vectors [B, D], so the same
couplings build the multi-scale image flows and the small 2-D flows used on toy data.
Plain single-device modules: no Lightning, no config imports.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scalegen.nets.init_flag import DataInitFlag

LOG_2PI = math.log(2 * math.pi)


def _f(t: Tensor) -> Tensor:
    """At least float32 (log-densities and log-dets are accumulated in full precision under bf16)."""
    return t if t.dtype == torch.float64 else t.float()


def _sum_except_batch(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def gaussian_log_prob(z: Tensor, mean: Tensor | None = None, log_std: Tensor | None = None) -> Tensor:
    """log N(z; mean, exp(log_std)^2) summed over all but the batch dimension -> [B] (nats)."""
    if mean is None:
        return _sum_except_batch(-0.5 * (_f(z) ** 2 + LOG_2PI))
    log_std = _f(log_std)
    return _sum_except_batch(-0.5 * (((_f(z) - _f(mean)) * torch.exp(-log_std)) ** 2 + LOG_2PI) - log_std)


class FlowLayer(nn.Module):
    """A bijection: forward(x) -> (z, logdet [B]); inverse(z) -> x."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, z: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class FlowSequence(FlowLayer):
    """Composition of flow layers; log-determinants add (chain rule)."""

    def __init__(self, layers: list[FlowLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0], dtype=_f(x).dtype)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z


# ---- data-space pre-processing (part of the flow, so its Jacobian is counted) -------------------
class LogitTransform(FlowLayer):
    """u in (0,1) -> logit(alpha + (1 - 2 alpha) u) (Dinh et al. 2017, Sec. 4.1); avoids the boundaries."""

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(s) - torch.log1p(-s)
        logdet = _sum_except_batch(math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s))
        return y, logdet

    def inverse(self, z: Tensor) -> Tensor:
        return (torch.sigmoid(z) - self.alpha) / (1 - 2 * self.alpha)


class Shift(FlowLayer):
    """u in [0,1) -> u - 0.5 (Glow's centring); volume preserving."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x - 0.5, x.new_zeros(x.shape[0], dtype=_f(x).dtype)

    def inverse(self, z: Tensor) -> Tensor:
        return z + 0.5


# ---- structural layers ------------------------------------------------------------------------
class Squeeze(FlowLayer):
    """[B, C, H, W] -> [B, 4C, H/2, W/2] (space-to-depth, Dinh et al. 2017 Fig. 3); a permutation."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0], dtype=_f(x).dtype)

    def inverse(self, z: Tensor) -> Tensor:
        return F.pixel_shuffle(z, 2)


class ActNorm(FlowLayer, DataInitFlag):
    """Per-channel affine y = (x + bias) * exp(log_scale) (Glow Sec. 3.1, Table 1 row 1).

    Data-dependent initialization: the first forward pass in training mode sets bias and scale so
    that the post-ActNorm activations of that batch have zero mean and unit variance per channel.
    Under data parallelism the replicas must agree: the caller passes `initialize` an `average` that
    means the statistics over ranks (the flow family does, before its first step); the network itself
    never calls collectives.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))

    def _view(self, p: Tensor, x: Tensor) -> Tensor:
        return p.view(1, -1, *([1] * (x.dim() - 2)))

    @torch.no_grad()
    def initialize(self, x: Tensor, average: Callable[[Tensor], Tensor] | None = None) -> None:
        """Set bias and scale from the statistics of `x`; `average` maps this batch's [2, C] (mean, mean of
        squares) to the values to use (e.g. their mean over ranks)."""
        dims = [d for d in range(x.dim()) if d != 1]
        xf = x.float()
        stats = torch.stack([xf.mean(dims), (xf**2).mean(dims)])
        if average is not None:
            stats = average(stats)
        mean, sq = stats[0], stats[1]
        std = (sq - mean**2).clamp_min(0).sqrt()
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.mark_initialized()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self.is_initialized():
            self.initialize(x)
        y = (x + self._view(self.bias, x)) * torch.exp(self._view(self.log_scale, x))
        spatial = math.prod(x.shape[2:]) if x.dim() > 2 else 1
        logdet = (spatial * _f(self.log_scale).sum()).expand(x.shape[0])
        return y, logdet

    def inverse(self, z: Tensor) -> Tensor:
        return z * torch.exp(-self._view(self.log_scale, z)) - self._view(self.bias, z)


class InvConv1x1(FlowLayer):
    """Invertible 1x1 convolution (Glow Sec. 3.2), W = P L (U + diag(sign(s) exp(log|s|))) (Eq. 10).

    With `lu=True` the log-determinant is sum(log|s|) * H * W, O(C) instead of O(C^3). P (a
    permutation) and sign(s) stay fixed; L, U and log|s| are learned. Initialized to a random rotation.
    """

    def __init__(self, channels: int, lu: bool = True) -> None:
        super().__init__()
        self.lu = lu
        w = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        if lu:
            p, lower, upper = torch.linalg.lu(w)
            s = torch.diagonal(upper)
            self.register_buffer("perm", p.float())
            self.register_buffer("sign_s", torch.sign(s).float())
            self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
            self.register_buffer("eye", torch.eye(channels))
            self.lower = nn.Parameter(lower.float())
            self.upper = nn.Parameter(torch.triu(upper, 1).float())
            self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())
        else:
            self.weight = nn.Parameter(w.float())

    def weight_and_logdet(self) -> tuple[Tensor, Tensor]:
        """W [C, C] and log|det W|, in at least float32 even under autocast (float64 stays float64)."""
        ref = self.lower if self.lu else self.weight
        dtype = torch.promote_types(ref.dtype, torch.float32)
        with torch.autocast(device_type=ref.device.type, enabled=False):
            if self.lu:
                mask = self.lower_mask.to(dtype)
                lower = self.lower.to(dtype) * mask + self.eye.to(dtype)
                diag = torch.diag(self.sign_s.to(dtype) * torch.exp(self.log_s.to(dtype)))
                upper = self.upper.to(dtype) * mask.T + diag
                return self.perm.to(dtype) @ lower @ upper, self.log_s.to(dtype).sum()
            w = self.weight.to(dtype)
            return w, torch.linalg.slogdet(w)[1]

    def _apply_matrix(self, x: Tensor, w: Tensor) -> Tensor:
        if x.dim() == 2:
            return x @ w.T.to(x.dtype)
        return F.conv2d(x, w.to(x.dtype).view(*w.shape, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w, logdet = self.weight_and_logdet()
        spatial = math.prod(x.shape[2:]) if x.dim() > 2 else 1
        return self._apply_matrix(x, w), (spatial * logdet).expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        w, _ = self.weight_and_logdet()
        return self._apply_matrix(z, torch.linalg.inv(w.double()).to(w.dtype))


# ---- affine coupling -----------------------------------------------------------------------------
class ZeroConv2d(nn.Module):
    """Zero-initialized 3x3 conv scaled by exp(3 * logs) (Glow Sec. 3.3: couplings start as identity)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_ch, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(3 * self.logs)


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def conv_conditioner(in_ch: int, out_ch: int, hidden: int, num_blocks: int) -> nn.Module:
    """s,t network: 3x3 conv, 1x1 conv, `num_blocks` residual blocks, zero-initialized 3x3 output.

    num_blocks=0 is Glow's NN() (3x3 - ReLU - 1x1 - ReLU - ZeroConv3x3); num_blocks>0 adds the
    residual blocks of RealNVP's ResNet conditioner (Dinh et al. 2017, Sec. 4.1).
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1)
    ]
    layers += [ResBlock(hidden) for _ in range(num_blocks)]
    layers += [nn.ReLU(), ZeroConv2d(hidden, out_ch)]
    return nn.Sequential(*layers)


def mlp_conditioner(in_dim: int, out_dim: int, hidden: int, num_blocks: int) -> nn.Module:
    """MLP s,t network for vector flows; last layer zero-initialized so the coupling starts as identity."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU()]
    for _ in range(num_blocks):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    last = nn.Linear(hidden, out_dim)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class AffineCoupling(FlowLayer):
    """y_b = x_b (given), y_a = x_a * exp(s(x_b)) + t(x_b) (Dinh et al. 2017 Eqs. 4-9; Glow Table 1).

    mask="checkerboard": x_b are the pixels with (i + j) % 2 == parity (all channels), or the features
        with index % 2 == parity for vectors; s and t are computed for every position and masked.
    mask="channel": x_b is one half of the channels (the first when parity=0), x_a the other half.
    scale="tanh": log s = w * tanh(raw) with a learned per-channel w (RealNVP);
    scale="sigmoid": log s = log sigmoid(raw + 2) (Glow's code); scale="none": additive coupling (NICE).
    """

    def __init__(self, channels: int, mask: str, parity: int, hidden: int, num_blocks: int = 0,
                 scale: str = "tanh", vector: bool = False) -> None:
        super().__init__()
        if mask not in ("checkerboard", "channel"):
            raise ValueError(f"mask must be checkerboard or channel, not {mask!r}")
        if scale not in ("tanh", "sigmoid", "none"):
            raise ValueError(f"scale must be tanh, sigmoid or none, not {scale!r}")
        self.mask, self.parity, self.scale, self.vector = mask, parity, scale, vector
        self.channels = channels
        if mask == "channel":
            self.n_cond = channels // 2 if parity == 0 else channels - channels // 2
            self.n_out = channels - self.n_cond
        else:
            self.n_cond = self.n_out = channels
        make = mlp_conditioner if vector else conv_conditioner
        self.net = make(self.n_cond, 2 * self.n_out, hidden, num_blocks)
        if scale == "tanh":
            self.tanh_scale = nn.Parameter(torch.ones(self.n_out))

    def _checker(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            idx = torch.arange(x.shape[1], device=x.device)
            return ((idx % 2) == self.parity).to(x.dtype).view(1, -1)
        h, w = x.shape[2:]
        ii = torch.arange(h, device=x.device).view(-1, 1)
        jj = torch.arange(w, device=x.device).view(1, -1)
        return (((ii + jj) % 2) == self.parity).to(x.dtype).view(1, 1, h, w)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(conditioning part, transformed part) for the channel mask."""
        first, second = x[:, : self.channels // 2], x[:, self.channels // 2:]
        return (first, second) if self.parity == 0 else (second, first)

    def _join(self, cond: Tensor, out: Tensor) -> Tensor:
        return torch.cat([cond, out] if self.parity == 0 else [out, cond], 1)

    def _log_s_t(self, h: Tensor) -> tuple[Tensor, Tensor]:
        raw = self.net(h)
        raw_s, t = raw[:, 0::2], raw[:, 1::2]
        if self.scale == "tanh":
            shape = (1, -1) + (1,) * (raw_s.dim() - 2)
            log_s = self.tanh_scale.view(shape) * torch.tanh(raw_s)
        elif self.scale == "sigmoid":
            log_s = F.logsigmoid(raw_s + 2.0)
        else:
            log_s = torch.zeros_like(raw_s)
        return log_s, t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.mask == "checkerboard":
            b = self._checker(x)
            log_s, t = self._log_s_t(x * b)
            log_s, t = log_s * (1 - b), t * (1 - b)
            y = b * x + (1 - b) * (x * torch.exp(log_s) + t)  # Dinh et al. 2017 Eq. 9
            return y, _sum_except_batch(_f(log_s))
        cond, xa = self._split(x)
        log_s, t = self._log_s_t(cond)
        ya = xa * torch.exp(log_s) + t  # Eq. 4-5 / Glow Table 1 row 3
        return self._join(cond, ya), _sum_except_batch(_f(log_s))

    def inverse(self, z: Tensor) -> Tensor:
        if self.mask == "checkerboard":
            b = self._checker(z)
            log_s, t = self._log_s_t(z * b)
            log_s, t = log_s * (1 - b), t * (1 - b)
            return b * z + (1 - b) * ((z - t) * torch.exp(-log_s))
        cond, ya = self._split(z)
        log_s, t = self._log_s_t(cond)
        return self._join(cond, (ya - t) * torch.exp(-log_s))


# ---- multi-scale architecture ------------------------------------------------------------------
class Split(nn.Module):
    """Factor out half the channels (Dinh et al. 2017 Sec. 3.6; Glow Sec. 3 "split").

    The factored-out half z2 is scored under N(0, I) (RealNVP) or, with `learned_prior`, under
    N(mu(x1), sigma(x1)^2) predicted from the kept half by a zero-initialized conv (Glow's split2d).
    """

    def __init__(self, channels: int, learned_prior: bool) -> None:
        super().__init__()
        self.keep = channels - channels // 2
        self.out = channels // 2
        self.prior = ZeroConv2d(self.keep, 2 * (channels - self.keep)) if learned_prior else None

    def _prior(self, x1: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if self.prior is None:
            return None, None
        h = self.prior(x1)
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(kept half, factored-out z, log p(z) [B])."""
        x1, z2 = x[:, : self.keep], x[:, self.keep:]
        mean, log_std = self._prior(x1)
        return x1, z2, gaussian_log_prob(z2, mean, log_std)

    def inverse(self, x1: Tensor, z2: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        if z2 is None:
            mean, log_std = self._prior(x1)
            shape = (x1.shape[0], self.out, *x1.shape[2:])
            eps = torch.randn(shape, device=x1.device, dtype=x1.dtype) * temperature
            z2 = eps if mean is None else mean + torch.exp(log_std) * eps
        return torch.cat([x1, z2], 1)


class MultiScaleFlow(nn.Module):
    """An image flow built from stages; each stage is a FlowSequence followed by an optional Split.

    log_prob(u) is the exact log-density of u (the dequantized image in [0,1)^D, see
    scalegen.objectives.flow), change of variables: log p(u) = sum_l log p(z_l) + sum_k log|det J_k|.
    """

    def __init__(self, stages: list[FlowSequence], splits: list[Split | None],
                 input_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(stages) != len(splits):
            raise ValueError("one split (or None) per stage")
        self.stages = nn.ModuleList(stages)
        self.splits = nn.ModuleList([s if s is not None else nn.Identity() for s in splits])
        self.has_split = [s is not None for s in splits]
        self.input_shape = tuple(input_shape)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """(latents, first to last, [B] total log-det, [B] log prior of all latents)."""
        logdet = x.new_zeros(x.shape[0], dtype=_f(x).dtype)
        logp = x.new_zeros(x.shape[0], dtype=_f(x).dtype)
        zs: list[Tensor] = []
        for stage, split, has in zip(self.stages, self.splits, self.has_split):
            x, ld = stage(x)
            logdet = logdet + ld
            if has:
                x, z, lp = split(x)
                zs.append(z)
                logp = logp + lp
        zs.append(x)
        logp = logp + gaussian_log_prob(x)
        return zs, logdet, logp

    def log_prob(self, x: Tensor) -> Tensor:
        _, logdet, logp = self(x)
        return logp + logdet

    def inverse(self, zs: list[Tensor] | None, n: int = 1, temperature: float = 1.0) -> Tensor:
        """x from the latents (all of them, as returned by forward), or sampled with `temperature`."""
        if zs is None:
            zs = [None] * (sum(self.has_split) + 1)  # type: ignore[list-item]
            top_shape = self.latent_shapes()[-1]
            param = next(self.parameters())
            zs[-1] = torch.randn(n, *top_shape, device=param.device, dtype=param.dtype) * temperature
        zs = list(zs)
        x = zs.pop()
        for stage, split, has in zip(reversed(self.stages), reversed(self.splits), reversed(self.has_split)):
            if has:
                x = split.inverse(x, zs.pop(), temperature)
            x = stage.inverse(x)
        return x

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """n draws, every latent scaled by `temperature` (Glow Sec. 5: T < 1 trades diversity for quality)."""
        return self.inverse(None, n, temperature)

    @torch.no_grad()
    def latent_shapes(self) -> list[tuple[int, ...]]:
        param = next(self.parameters())
        was = self.training
        self.eval()
        probe = torch.full((1, *self.input_shape), 0.5, device=param.device, dtype=param.dtype)
        zs, _, _ = self(probe)
        self.train(was)
        return [tuple(z.shape[1:]) for z in zs]


def realnvp(shape: tuple[int, int, int], num_scales: int = 3, hidden: int = 64, num_blocks: int = 8,
            alpha: float = 0.05, actnorm: bool = False) -> MultiScaleFlow:
    """RealNVP's multi-scale architecture (Dinh et al. 2017 Sec. 3.6, 4.1).

    Each scale: 3 checkerboard couplings, squeeze, 3 channel couplings, split half; the last scale:
    4 checkerboard couplings. Couplings use tanh-bounded log-scales and ResNet conditioners.
    """
    c, h, w = shape
    if h % 2 ** (num_scales - 1) or w % 2 ** (num_scales - 1):
        raise ValueError(f"image {h}x{w} cannot be squeezed {num_scales - 1} times")
    stages: list[FlowSequence] = []
    splits: list[Split | None] = []
    for scale in range(num_scales):
        layers: list[FlowLayer] = [LogitTransform(alpha)] if scale == 0 else []
        last = scale == num_scales - 1
        for i in range(4 if last else 3):
            if actnorm:
                layers.append(ActNorm(c))
            layers.append(AffineCoupling(c, "checkerboard", i % 2, hidden, num_blocks, "tanh"))
        if not last:
            layers.append(Squeeze())
            c *= 4
            for i in range(3):
                if actnorm:
                    layers.append(ActNorm(c))
                layers.append(AffineCoupling(c, "channel", i % 2, hidden, num_blocks, "tanh"))
        stages.append(FlowSequence(layers))
        splits.append(None if last else Split(c, learned_prior=False))
        if not last:
            c = c - c // 2
    return MultiScaleFlow(stages, splits, shape)


def glow(shape: tuple[int, int, int], num_levels: int = 3, steps_per_level: int = 32, hidden: int = 512,
         lu: bool = True, coupling: str = "affine", learned_prior: bool = True) -> MultiScaleFlow:
    """Glow (Kingma & Dhariwal 2018, Fig. 2): per level, squeeze, K x [ActNorm, 1x1 conv, coupling], split.

    coupling="affine" uses sigmoid log-scales, "additive" sets log s = 0 (Glow Sec. 5.2 compares both).
    """
    c, h, w = shape
    if h % 2**num_levels or w % 2**num_levels:
        raise ValueError(f"image {h}x{w} cannot be squeezed {num_levels} times")
    stages: list[FlowSequence] = []
    splits: list[Split | None] = []
    scale = "sigmoid" if coupling == "affine" else "none"
    for level in range(num_levels):
        layers: list[FlowLayer] = [Shift()] if level == 0 else []
        layers.append(Squeeze())
        c *= 4
        for _ in range(steps_per_level):
            layers += [ActNorm(c), InvConv1x1(c, lu), AffineCoupling(c, "channel", 0, hidden, 0, scale)]
        last = level == num_levels - 1
        stages.append(FlowSequence(layers))
        splits.append(None if last else Split(c, learned_prior))
        if not last:
            c = c - c // 2
    return MultiScaleFlow(stages, splits, shape)


class VectorFlow(nn.Module):
    """A flow on R^D with a standard-normal base: alternating-mask affine couplings (+ ActNorm).

    Used for toy densities (two moons); log_prob is exact.
    """

    def __init__(self, dim: int, num_couplings: int = 8, hidden: int = 64, num_blocks: int = 1,
                 actnorm: bool = True, scale: str = "tanh") -> None:
        super().__init__()
        layers: list[FlowLayer] = []
        for i in range(num_couplings):
            if actnorm:
                layers.append(ActNorm(dim))
            layers.append(AffineCoupling(dim, "checkerboard", i % 2, hidden, num_blocks, scale, vector=True))
        self.flow = FlowSequence(layers)
        self.dim = dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow(x)

    def inverse(self, z: Tensor) -> Tensor:
        return self.flow.inverse(z)

    def log_prob(self, x: Tensor) -> Tensor:
        z, logdet = self.flow(x)
        return gaussian_log_prob(z) + logdet

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        param = next(self.parameters())
        z = torch.randn(n, self.dim, device=param.device, dtype=param.dtype) * temperature
        return self.flow.inverse(z)
