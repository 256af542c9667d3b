"""Writing checkpoints: atomic writes and the config inside every checkpoint (reading them: scalegen.checkpoints)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file beside the target and renames it over: a crash while saving
    leaves the previous checkpoint intact (os.replace is atomic on POSIX)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class SaveConfigInCheckpoint(L.Callback):
    """Stores the resolved config and the DataSpec in every checkpoint, so a checkpoint alone rebuilds its model."""

    def __init__(self, resolved_config: dict, data_spec: Any) -> None:
        self.payload = {"config": resolved_config, "data_spec": dataclasses.asdict(data_spec)}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["scalegen"] = self.payload
