"""WaveNet (van den Oord et al. 2016c): dilated causal convolutions over mu-law audio codes.

Output t is a softmax over the Q quantization levels of x_t given x_<t (and an optional global
condition g): the input is shifted right by one step, so every convolution after it may include
its current step. Layers: a causal "input" conv (kernel k0), then residual layers of
gated dilated causal convolutions z = tanh(W_f * x + V_f g) * sigmoid(W_g * x + V_g g) (2016c Eq. 2),
each with a 1x1 residual and a 1x1 skip output; ReLU - 1x1 - ReLU - 1x1 over the summed skips.

Receptive field: output t depends on exactly x_{t-R} .. x_{t-1} with
R = k0 + (k - 1) * sum(dilations).

`init_state` / `step` generate one sample at a time with per-layer input queues (Paine et al.
2016, "Fast WaveNet"), giving the same logits as the full forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WaveNet(nn.Module):
    def __init__(self, levels: int = 256, residual_channels: int = 64, dilation_channels: int = 64,
                 skip_channels: int = 256, kernel_size: int = 2, layers_per_stack: int = 10,
                 num_stacks: int = 3, input_kernel_size: int = 2, num_classes: int = 0) -> None:
        super().__init__()
        self.levels, self.kernel_size, self.input_kernel_size = levels, kernel_size, input_kernel_size
        # Dilations 1, 2, ..., 2^(L-1), repeated for each stack (2016c Sec. 2.1).
        self.dilations = [2**i for _ in range(num_stacks) for i in range(layers_per_stack)]
        self.input_conv = nn.Conv1d(levels, residual_channels, input_kernel_size)
        self.filter_gate = nn.ModuleList(
            nn.Conv1d(residual_channels, 2 * dilation_channels, kernel_size, dilation=d)
            for d in self.dilations
        )
        self.residual = nn.ModuleList(
            nn.Conv1d(dilation_channels, residual_channels, 1) for _ in self.dilations
        )
        self.skip = nn.ModuleList(nn.Conv1d(dilation_channels, skip_channels, 1) for _ in self.dilations)
        self.num_classes = num_classes
        if num_classes > 0:  # global conditioning (2016c Eq. 2); id -1 = "unknown" gets its own embedding
            self.cond_embed = nn.Embedding(num_classes + 1, 2 * dilation_channels * len(self.dilations))
        self.out1 = nn.Conv1d(skip_channels, skip_channels, 1)
        self.out2 = nn.Conv1d(skip_channels, levels, 1)

    @property
    def receptive_field(self) -> int:
        """Number of past samples each output depends on: R = k0 + (k - 1) * sum(dilations)."""
        return self.input_kernel_size + (self.kernel_size - 1) * sum(self.dilations)

    def _cond(self, g: Tensor | None, n: int) -> Tensor | None:
        if self.num_classes == 0:
            return None
        if g is None:  # unconditional use of a conditional net: the "unknown" embedding
            g = torch.full((n,), -1, dtype=torch.long, device=self.cond_embed.weight.device)
        g = torch.where(g < 0, torch.full_like(g, self.num_classes), g)
        return self.cond_embed(g).view(n, len(self.dilations), -1, 1)

    def one_hot(self, codes: Tensor) -> Tensor:
        """int codes [B, T] or [B, 1, T] -> one-hot float [B, Q, T]."""
        if codes.dim() == 3:
            codes = codes[:, 0]
        dtype = self.input_conv.weight.dtype
        # scatter, not F.one_hot: one_hot checks the codes' range on the host in every call
        codes = codes.long()
        onehot = torch.zeros(codes.shape[0], self.levels, codes.shape[1], dtype=dtype, device=codes.device)
        return onehot.scatter_(1, codes.unsqueeze(1), 1)

    def forward(self, codes: Tensor, g: Tensor | None = None) -> Tensor:
        """Codes [B, (1,) T] -> logits [B, Q, T]; logits[..., t] parameterize p(x_t | x_<t, g)."""
        return self.forward_one_hot(self.one_hot(codes), g)

    def forward_one_hot(self, x: Tensor, g: Tensor | None = None) -> Tensor:
        """The same on a (possibly relaxed) one-hot input [B, Q, T] (differentiable: causality tests)."""
        n = x.shape[0]
        x = F.pad(x, (1, 0))[:, :, :-1]  # shift right: step t sees x_<t only
        h = self.input_conv(F.pad(x, (self.input_kernel_size - 1, 0)))
        cond = self._cond(g, n)
        skips = 0
        for i, d in enumerate(self.dilations):
            skip, h = self._layer(i, F.pad(h, ((self.kernel_size - 1) * d, 0)), h, cond)  # causal: left pad
            skips = skips + skip
        return self._head(skips)

    def _layer(self, i: int, window: Tensor, h: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        """Layer i's gated activation over `window` (its dilated input): (skip output, next residual h)."""
        a = self.filter_gate[i](window)
        if cond is not None:
            a = a + cond[:, i]
        f, gate = a.chunk(2, 1)
        z = torch.tanh(f) * torch.sigmoid(gate)
        return self.skip[i](z), h + self.residual[i](z)

    def _head(self, skips: Tensor) -> Tensor:
        return self.out2(F.relu(self.out1(F.relu(skips))))

    # ---- incremental generation ---------------------------------------------------------------
    def init_state(self, n: int, g: Tensor | None = None) -> list:
        """Zero queues (the causal zero padding) for n sequences, plus the condition biases (or None)."""
        w = self.input_conv.weight
        state = [torch.zeros(n, self.levels, self.input_kernel_size, device=w.device, dtype=w.dtype)]
        for d, conv in zip(self.dilations, self.filter_gate):
            state.append(torch.zeros(n, conv.in_channels, (self.kernel_size - 1) * d + 1,
                                     device=w.device, dtype=w.dtype))
        state.append(self._cond(None if g is None else g.to(w.device), n))  # type: ignore[arg-type]
        return state

    def step(self, prev: Tensor | None, state: list) -> tuple[Tensor, list]:
        """Logits [n, Q] for the next sample given the previous code [n] (None at t = 0)."""
        n = state[0].shape[0]
        cond = state[-1]
        if prev is None:
            inp = torch.zeros(n, self.levels, 1, device=state[0].device, dtype=state[0].dtype)
        else:
            inp = self.one_hot(prev.view(n, 1))
        new_state = [torch.cat([state[0][:, :, 1:], inp], 2)]
        h = self.input_conv(new_state[0])  # [n, R, 1]
        skips = 0
        for i in range(len(self.dilations)):
            queue = torch.cat([state[i + 1][:, :, 1:], h], 2)
            new_state.append(queue)
            skip, h = self._layer(i, queue, h, cond)  # the queue spans exactly (k-1)d+1 steps: one output
            skips = skips + skip
        new_state.append(cond)
        logits = self._head(skips)
        return logits[:, :, 0], new_state
