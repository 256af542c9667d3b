"""A checkpointed "initialized from data" flag that is read on the host once, not in every step.

Layers with a data-dependent start (ActNorm, a VQ codebook set from encoder outputs) keep the flag in a
buffer so checkpoints carry it; reading that buffer as a Python bool in every forward would make the CPU
wait for the device, so the bool is cached and the cache is dropped whenever a state dict is loaded.
"""

from __future__ import annotations

import torch
from torch import nn


class DataInitFlag(nn.Module):
    """Base for such layers: `is_initialized()` (cached) and `mark_initialized()`."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("initialized", torch.tensor(False))
        self._ready: bool | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_ready", None))

    def is_initialized(self) -> bool:
        if self._ready is None:
            self._ready = bool(self.initialized)
        return self._ready

    def mark_initialized(self) -> None:
        self.initialized.fill_(True)
        self._ready = True
