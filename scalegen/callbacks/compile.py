"""`trainer.compile`: torch.compile each network of the family, not the LightningModule.

The networks are the family's `nn.Module` children that hold parameters and have layers of their own
(a UNet, an encoder and a decoder; not a lone embedding table). Each is compiled in place with
`nn.Module.compile`, so parameter names, state dicts, checkpoints and the EMA are unchanged, and the
loss, sampling and evaluation code around the networks stays eager Python. A family whose networks
cannot be compiled sets the class attribute `compile_unsupported = "why"`; it then runs eager and
says so in one line.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from scalegen.errors import ConfigError

MODES = ("default", "reduce-overhead", "max-autotune")


def compile_networks(module: torch.nn.Module, mode: str = "default", backend: str = "inductor") -> list[str]:
    """Compile `module`'s networks in place; returns their attribute names ([] when it runs eager).

    `backend="eager"` or `"aot_eager"` traces with dynamo without generating code (tests, debugging).
    """
    if mode not in MODES:
        raise ConfigError(f"trainer.compile_mode={mode!r}: use one of {', '.join(MODES)}")
    if not hasattr(torch.nn.Module, "compile"):
        raise ConfigError(f"trainer.compile needs torch >= 2.2 (nn.Module.compile); this is {torch.__version__}")
    reason = getattr(type(module), "compile_unsupported", None)
    if reason:
        rank_zero_warn(f"trainer.compile: {type(module).__name__} runs eager ({reason})")
        return []
    # Options other than the default mode belong to inductor only.
    kwargs = {"mode": mode} if backend == "inductor" and mode != "default" else {}
    names = []
    for name, child in module.named_children():
        if next(child.parameters(), None) is not None and next(child.children(), None) is not None:
            child.compile(backend=backend, **kwargs)
            names.append(name)
    if not names:
        rank_zero_warn(f"trainer.compile: {type(module).__name__} has no network children to compile; runs eager")
    return names


class CompileNetworks(L.Callback):
    """Compiles the family's networks when the Trainer sets up (before the strategy wraps the module)."""

    def __init__(self, mode: str = "default", backend: str = "inductor") -> None:
        self.mode, self.backend = mode, backend
        self.compiled: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not self.compiled:
            self.compiled = compile_networks(pl_module, self.mode, self.backend)
