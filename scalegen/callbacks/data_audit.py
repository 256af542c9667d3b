"""What the data pipeline did: bad samples skipped (logged), and optionally which samples each rank saw."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class DataAudit(L.Callback):
    """Logs `data/skipped_samples` (cumulative bad samples this rank skipped) and `data/replacement_samples`
    (cumulative good samples that stood in for them). With `record_keys`, appends
    every training sample key this rank consumed to `{run_dir}/sample_keys/rank{R}.txt`, to audit sharding."""

    def __init__(self, run_dir: Path, record_keys: bool = False) -> None:
        self.folder = Path(run_dir) / "sample_keys"
        self.record_keys = record_keys

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        logs = getattr(pl_module, "logs_this_step", None)
        if "skipped" in batch and (logs is None or logs()):  # a running total: the logged steps suffice
            pl_module.log("data/skipped_samples", torch.as_tensor(batch["skipped"], dtype=torch.float32).max(),
                          reduce_fx="max", sync_dist=False, batch_size=1)
            if "replaced" in batch:  # good samples standing in for lost ones (docs/data.md, Bad data)
                pl_module.log("data/replacement_samples", torch.as_tensor(batch["replaced"], dtype=torch.float32),
                              reduce_fx="max", sync_dist=False, batch_size=1)
        if self.record_keys and "key" in batch:
            self.folder.mkdir(parents=True, exist_ok=True)
            with (self.folder / f"rank{trainer.global_rank}.txt").open("a") as f:
                f.writelines(f"{key}\n" for key in batch["key"])
