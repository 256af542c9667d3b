"""Every tiny recipe trains end to end on CPU, its checkpoint rebuilds a working model, `scalegen eval`
scores it with the metrics that apply to its family, and its final training loss and evaluation metrics
match the recorded reference (tests/regression_reference.json) within a stated tolerance.

The reference is a regression guard, not a target: a change that moves a value beyond the tolerance
fails here, and updating it is a deliberate commit that says why the numbers moved:
`SCALEGEN_UPDATE_REFERENCE=1 pytest tests/test_recipes.py` rewrites the entries of the recipes it ran.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from scalegen.cli.main import main
from scalegen.config.loader import RECIPES_DIR
from scalegen.runtime import load_model

TINY = sorted(RECIPES_DIR.rglob("tiny*.yaml"))
REFERENCE = Path(__file__).with_name("regression_reference.json")
# Same seed, one thread, same data: on one torch build the runs repeat exactly. The tolerances absorb
# other builds' kernels (reduction order, vectorization), which move a few-step loss by well under 1 %.
LOSS_RTOL, METRIC_RTOL = 0.02, 0.05
# Not compared: the sample metrics of the domain classifier (eval/domain_*). That classifier is itself trained
# (500+ steps) when evaluation first needs it, and another reduction order trains a different one (2 threads
# instead of 1 here; this AVX-512 machine instead of the one the references were recorded on): with the same
# code, on 64 samples of a tiny model, coverage then moved by 30 % and KID by 44 %.
# They are still computed and must be finite; tests/metrics checks them against independent computations.
UNCOMPARED_PREFIX = "eval/domain_"


def _check_reference(name: str, observed: dict[str, float]) -> None:
    recorded = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    if os.environ.get("SCALEGEN_UPDATE_REFERENCE"):
        recorded[name] = observed
        REFERENCE.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    assert name in recorded, f"no regression reference for {name}: record one with SCALEGEN_UPDATE_REFERENCE=1"
    expected = recorded[name]
    assert set(observed) == set(expected), f"{name}: metrics {sorted(observed)} vs reference {sorted(expected)}"
    for key, want in expected.items():
        if key.startswith(UNCOMPARED_PREFIX):
            continue
        rtol = LOSS_RTOL if key == "train/loss" else METRIC_RTOL
        got = observed[key]
        assert math.isclose(got, want, rel_tol=rtol, abs_tol=1e-6), (
            f"{name}: {key} = {got:.6g}, reference {want:.6g} (rel. tolerance {rtol}); if the change is "
            "intended, re-record with SCALEGEN_UPDATE_REFERENCE=1 and say why in the commit")


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
                "eval/linear_probe": "encode" in caps, "eval/semisup": "encode" in caps,
                **{f"eval/{m}": "classify" in caps for m in ("accuracy", "ece", "ood")}}
    assert {k for k, applies in expected.items() if applies} <= set(summary), sorted(summary)
    assert all(math.isfinite(v) for v in summary.values()), summary
    assert (tmp_path / "eval" / "report.md").is_file()
    _check_reference(str(recipe.relative_to(RECIPES_DIR).with_suffix("")),
                     {"train/loss": losses[-1], **{k: float(v) for k, v in summary.items()}})
