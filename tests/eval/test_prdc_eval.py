"""Precision/recall/density/coverage through the evaluation runner, from the same features as FID."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_models import FactorizedCategorical, blobs, fit_to, make_model  # noqa: E402

from scalegen.config.schema import EvalConfig  # noqa: E402
from scalegen.eval.data import EvalData  # noqa: E402
from scalegen.eval.extractors import domain_extractor  # noqa: E402
from scalegen.eval.runner import evaluate  # noqa: E402
from scalegen.metrics.prdc import prdc  # noqa: E402


def test_runner_reports_prdc_computed_from_the_fid_features(tmp_path):
    model = make_model(FactorizedCategorical)
    x, y = blobs(300, seed=0)
    fit_to(model, x)
    data = EvalData.from_arrays("blobs", model.data_spec, {"train": (x, y), "test": blobs(50, seed=1)})
    cfg = EvalConfig(num_samples=150, batch_size=64, kid_subsets=2, kid_subset_size=50, prdc_examples=120)
    res = evaluate(model, cfg, data, tmp_path, metrics="fid")
    m = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    for name in ("precision", "recall", "density", "coverage"):
        e = m[f"domain_{name}"]
        assert e["num_samples"] == e["num_real"] == 120 and e["reference"]["split"] == "train"
        assert e["label"] == f"domain {name} (classifier trained on blobs)" and e["definition"]
        assert res["summary"][f"eval/domain_{name}"] == pytest.approx(e["value"])
    assert m["domain_precision"]["k"] == 3 and m["domain_coverage"]["k"] == 5

    # Independently: the same samples (the runner seeds with eval.seed), the cached reference subset and
    # the domain classifier's features, fed to prdc directly.
    torch.manual_seed(cfg.seed)
    samples = torch.cat([model.sample(64), model.sample(64), model.sample(22)])
    ex = domain_extractor(data, torch.device("cpu"))
    fake = ex(samples)[0][:120]
    (stats,) = (Path(os.environ["SCALEGEN_CACHE"]) / "fid_stats").glob("blobs-train-domain_*.npz")
    real = np.load(stats)["prdc_features"]  # >= 120 (more when another test of this session cached it)
    assert real.shape[0] >= 120 and real.shape[1] == 64
    real = real[:120]  # the runner takes the first n of the seeded subset
    want = prdc(real, fake, 3, 5)
    for name in ("precision", "recall", "density", "coverage"):
        assert m[f"domain_{name}"]["value"] == pytest.approx(want[name], abs=1e-12), name
    # The factorized model misses the per-class row structure: its samples are off the data manifold.
    assert m["domain_precision"]["value"] < 0.5

    report = (tmp_path / "report.md").read_text()
    assert "| domain_recall |" in report and "120 samples vs 120 of the train split, k=3" in report

    # prdc_examples=0 turns them off; a cache without enough PRDC features is recomputed, not misread.
    off = evaluate(model, EvalConfig(**{**cfg.__dict__, "prdc_examples": 0}), data, None, metrics="fid")
    assert "domain_precision" not in off["metrics"] and "domain_fid" in off["metrics"]
    more = evaluate(model, EvalConfig(**{**cfg.__dict__, "prdc_examples": 140}), data, None, metrics="fid")
    assert more["metrics"]["domain_precision"]["num_real"] == 140
