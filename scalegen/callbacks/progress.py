"""The progress bar: Lightning's Rich bar, showing the training loss without a host-device sync every batch.

Lightning turns every value logged with `prog_bar=True` into a Python number after every batch, whether or
not it was logged again (`.item()`: on a GPU the CPU waits for the device; Lightning issue #21232). The
families log their training scalars without `prog_bar`, and only on the steps the loggers write, so this bar
reads each shown value once, on the step that logged it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from torch import Tensor

SHOWN = "train/loss"  # every family logs it (a GAN: its discriminator's)


class ProgressBar(RichProgressBar):
    def __init__(self) -> None:
        super().__init__(leave=True)
        # (the logged tensor, its value). Lightning hands out a new detached view of the stored value at each
        # call; holding the view keeps its memory, so a newer value cannot have the same address.
        self.read: tuple[Tensor, float] | None = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        value = trainer.logged_metrics.get(SHOWN)
        if value is not None:
            if self.read is None or self.read[0].data_ptr() != value.data_ptr():  # logged since it was read
                self.read = (value, float(value))
            items[SHOWN] = self.read[1]
        return items
