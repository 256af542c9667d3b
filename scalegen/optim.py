"""One optimizer + LR-schedule builder for every family (a family with several optimizers calls it once each)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from scalegen.config.loader import plain
from scalegen.config.schema import OptimConfig


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, lr: float | None = None,
                   fuse_on_cpu: bool = True):
    lr = cfg.lr if lr is None else lr
    params = list(params)
    # On CPU, PyTorch defaults to its per-parameter Python loop; the fused kernel computes the same update
    # ~4x faster (0.78 vs 0.19 ms a step for the quickstart VAE). On GPUs PyTorch's default (foreach) stays.
    fused = {"fused": True} if fuse_on_cpu and _all_on_cpu(params) else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, **fused)


def _all_on_cpu(params: list[Any]) -> bool:
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    return bool(tensors) and all(t.device.type == "cpu" and t.is_floating_point() for t in tensors)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier on the peak lr at optimizer step `step`: linear warm-up, then the decay schedule."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total_steps <= cfg.warmup_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, total_steps: int,
                    lr: float | None = None, fuse_on_cpu: bool = True) -> dict[str, Any]:
    """Lightning's optimizer dict: the optimizer and a per-step LambdaLR schedule."""
    optimizer = make_optimizer(params, cfg, lr, fuse_on_cpu)
    schedule = plain(cfg)  # the lambda runs every step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, schedule, total_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
