"""The evaluation pipeline: `evaluate(model, cfg.eval, data, out_dir)` -> metrics.json + report.md."""

from scalegen.eval.data import EvalData
from scalegen.eval.runner import ALL_METRICS, DEFINITIONS, evaluate

__all__ = ["ALL_METRICS", "DEFINITIONS", "EvalData", "evaluate"]
