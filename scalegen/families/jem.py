"""Joint energy models (JEM, Grathwohl et al. 2020): a classifier's logits f(x) define p(y|x) =
softmax f(x) and an energy E(x) = -logsumexp_y f(x)[y], so p(x) ∝ exp(-E(x)) (eq. 4-5).

Loss = cross-entropy on the labelled examples + gen_weight * the SGLD maximum-likelihood term on log p(x)
over every example (eq. 8), with the negatives, replay buffer (per rank, checkpointed) and divergence
guard of the `ebm` family (`scalegen.families.ebm`), which this family extends. Labelled examples are
the batch's rows with y >= 0, or the `x_labelled` / `y_labelled` batch when the data provides one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from scalegen.config.schema import OptimConfig, choice, ranged
from scalegen.dataspec import DataSpec, images_to_unit
from scalegen.errors import ConfigError
from scalegen.families.ebm import EBM, EBMConfig
from scalegen.nets.ebm import EnergyCNN
from scalegen.objectives.ebm import ml_loss
from scalegen.registry import register_family


@dataclass
class JEMConfig(EBMConfig):
    family: str = "jem"
    energy_reg: float = ranged(0.0, ge=0)  # JEM uses no energy regularizer
    gen_weight: float = ranged(1.0, ge=0)  # weight of the log p(x) term; 0 = a plain classifier
    sample_from: str = choice("noise", "buffer")  # JEM's samples start from noise


@register_family("jem", JEMConfig, "Joint energy model (JEM): classifier logits as an energy, SGLD negatives")
class JEM(EBM):
    """JEM: classify with softmax f(x), sample with Langevin on E(x) = -logsumexp f(x)."""

    predictions = frozenset({"sample", "energy", "classify", "complete"})
    monitor = "val/accuracy"
    monitor_mode = "max"

    def __init__(self, cfg: JEMConfig, optim: OptimConfig, data: DataSpec) -> None:
        if data.num_classes < 2:
            raise ConfigError("the jem family needs labelled data with at least 2 classes")
        super().__init__(cfg, optim, data)

    def build_net(self, cfg: JEMConfig, data: DataSpec) -> torch.nn.Module:
        return EnergyCNN(data.shape[0], cfg.widths, data.num_classes, cfg.spectral_norm)

    def logits(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = images_to_unit(x, self.data_spec.levels)
        return self.net(x)

    def energy(self, x: Tensor) -> Tensor:
        return -torch.logsumexp(self.logits(x), 1)

    def classify(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.logits(x), 1)

    def _labelled(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The labelled examples (for validation; the training loss weights rows instead of selecting them)."""
        if "x_labelled" in batch:
            return batch["x_labelled"], batch["y_labelled"]
        y = batch.get("y")
        if y is None:
            return batch["x"][:0], torch.zeros(0, dtype=torch.long, device=batch["x"].device)
        keep = y >= 0
        return batch["x"][keep], y[keep]

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x_l, y_l = (batch["x_labelled"], batch["y_labelled"]) if "x_labelled" in batch else (batch["x"], batch.get("y"))
        logs: dict[str, Tensor] = {}
        loss = torch.zeros((), device=self.device)
        if y_l is not None:
            # Unlabelled rows (y = -1) weighted 0 rather than dropped: selecting rows by label would read
            # their count on the host. A batch with no label adds 0.
            known = (y_l >= 0).float()
            n = known.sum().clamp(min=1)
            logits = self.logits(self.positives(x_l))
            ce = (F.cross_entropy(logits, y_l.clamp(min=0), reduction="none") * known).sum() / n
            loss = loss + ce
            logs.update(ce=ce.detach(), accuracy=((logits.argmax(1) == y_l).float() * known).sum() / n)
        if self.cfg.gen_weight > 0:
            x_pos = self.positives(batch["x"])
            x_neg = self.negatives(len(x_pos), update_buffer=self.training)
            e_pos, e_neg = self.energy(x_pos), self.energy(x_neg)
            self.guard_energies(e_pos, e_neg)
            gen, contrastive = ml_loss(e_pos, e_neg, self.cfg.energy_reg)
            loss = loss + self.cfg.gen_weight * gen
            logs.update(contrastive=contrastive.detach(), energy_data=e_pos.mean().detach(),
                        energy_samples=e_neg.mean().detach())
        return loss, logs

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """val/accuracy and val/loss (cross-entropy) on the labelled validation examples."""
        x, y = self._labelled(batch)
        if not len(y):
            return
        logits = self.logits(x)
        n = len(y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/accuracy", (logits.argmax(1) == y).float().mean(), sync_dist=True, batch_size=n)
