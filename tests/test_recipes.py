"""Every tiny recipe trains end to end on CPU, its checkpoint rebuilds a working model, and `scalegen eval`
scores it with the metrics that apply to its family."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from scalegen.cli.main import main
from scalegen.config.loader import RECIPES_DIR
from scalegen.runtime import load_model

TINY = sorted(RECIPES_DIR.rglob("tiny*.yaml"))


@pytest.mark.parametrize("recipe", TINY, ids=[str(p.relative_to(RECIPES_DIR)) for p in TINY])
def test_tiny_recipe_trains_end_to_end(recipe: Path, tmp_path: Path, train_recipe) -> None:
    run = train_recipe(str(recipe), tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses and all(isinstance(v, float) and math.isfinite(v) for v in losses)
    model, cfg = load_model(run / "checkpoints" / "last.ckpt")
    if "sample" in model.predictions:
        torch.manual_seed(0)
        samples = model.sample(2)
        assert samples.shape[1:] == model.data_spec.shape
    if "nll" in model.predictions:
        batch_shape = (2, *model.data_spec.shape)
        x = torch.zeros(batch_shape, dtype=torch.uint8) if model.data_spec.kind == "image" else None
        if x is not None:
            assert torch.isfinite(model.nll(x)).all()
    # ... and `scalegen eval` scores it with every metric that applies to its family (small budgets here).
    caps, image = model.predictions, model.data_spec.kind == "image"
    budget = ["--num-samples", "64", "eval.max_examples=128", "eval.iwae_k=4", "eval.probe_seeds=1",
              "eval.probe_steps=30", "eval.probe_train_examples=300", "eval.label_curve=[1,10]"]
    assert main(["eval", str(run), "--out", str(tmp_path / "eval"), "--no-wandb", *budget]) == 0
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())["summary"]
    expected = {"eval/bpd": "nll" in caps, "eval/domain_fid": "sample" in caps and image,
                "eval/linear_probe": "encode" in caps, "eval/semisup": "encode" in caps}
    assert {k for k, applies in expected.items() if applies} <= set(summary), sorted(summary)
    assert all(math.isfinite(v) for v in summary.values()), summary
    assert (tmp_path / "eval" / "report.md").is_file()
