"""Which samples each rank saw (`trainer.record_sample_keys`), to audit sharding. (The bad-sample counters
`data/skipped_samples` and `data/replacement_samples` are logged by the family's base class.)"""

from __future__ import annotations

from pathlib import Path

import lightning as L


class DataAudit(L.Callback):
    """Appends every training sample key this rank consumed to `{run_dir}/sample_keys/rank{R}.txt`."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = Path(run_dir) / "sample_keys"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if "key" in batch:
            self.folder.mkdir(parents=True, exist_ok=True)
            with (self.folder / f"rank{trainer.global_rank}.txt").open("a") as f:
                f.writelines(f"{key}\n" for key in batch["key"])
