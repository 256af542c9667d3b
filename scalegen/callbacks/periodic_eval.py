"""`PeriodicEval(cfg)`: the evaluation pipeline on the in-training model every `cfg.eval.every_n_steps`.

The runtime adds it when `eval.every_n_steps` is set. Every rank takes part (the work is split and
gathered exactly); rank 0 writes `{run}/eval/step-XXXXXXX/` (metrics.json, report.md, figures) and
the trainer's loggers (metrics file, W&B) receive the flat `eval/...` values at that step. The
model's training mode and the global RNG state are restored afterwards, so evaluating does not
change the course of training. With the EMA callback and `ema.use_for_eval`, the averaged weights
are evaluated.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L

from scalegen.eval.data import EvalData
from scalegen.eval.runner import evaluate


class PeriodicEval(L.Callback):
    def __init__(self, cfg: Any, data: EvalData | None = None) -> None:
        """`cfg` is the full run config (its `eval` and `data` sections are used); `data` overrides the
        recipe's data (tests, notebooks)."""
        self.cfg = cfg
        self.every = cfg.eval.every_n_steps
        self._data = data
        self._last_step = -1
        self.history: list[dict[str, float]] = []  # the summaries logged so far (rank 0's, on every rank)

    @property
    def data(self) -> EvalData:
        if self._data is None:
            self._data = EvalData.from_config(self.cfg.data)
        return self._data

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.every or step == 0 or step % self.every or step == self._last_step:
            return
        self._last_step = step
        self.evaluate(trainer, pl_module, step)

    def evaluate(self, trainer: L.Trainer, pl_module: Any, step: int) -> dict:

        run_dir = Path(trainer.default_root_dir)
        out = Path(self.cfg.eval.out_dir) if self.cfg.eval.out_dir else run_dir / "eval"
        out = out / f"step-{step:07d}"
        with self._averaged_weights(trainer, pl_module):
            results = evaluate(pl_module, self.cfg.eval, self.data, out, step=step, run_dir=run_dir, log_wandb=False)
        summary = results["summary"]
        self.history.append({"step": step, **summary})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(summary, step=step)
                if self.cfg.eval.log_wandb and hasattr(logger, "log_image"):
                    for name, fname in results.get("figures", {}).items():
                        try:
                            logger.log_image(key=f"eval/{name}", images=[str(out / fname)], step=step)
                        except Exception:  # a logger that cannot take images must not stop training
                            pass
        return results

    @staticmethod
    def _averaged_weights(trainer: L.Trainer, pl_module: Any) -> Any:
        """The EMA callback's averaged weights for the duration (when it is there and ema.use_for_eval)."""

        for cb in trainer.callbacks:
            if hasattr(cb, "swapped") and hasattr(cb, "use_for_eval"):
                return cb.swapped(trainer, pl_module)
        return nullcontext()
