"""The only place that knows distributed strategies and batch-size arithmetic."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


def trainer_kwargs(trainer_cfg: DictConfig, per_device_batch_size: int) -> dict[str, Any]:
    """Lightning Trainer kwargs for strategy, precision and gradient accumulation."""
    return {"strategy": trainer_cfg.strategy, "precision": trainer_cfg.precision,
            "accumulate_grad_batches": trainer_cfg.accumulate_grad_batches}
