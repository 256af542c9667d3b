"""The runner end to end through the family contract, on small real models defined in toy_models.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_models import FactorizedCategorical, WithClassifier, blobs, fit_to, make_model  # noqa: E402

from scalegen.config.schema import EvalConfig  # noqa: E402
from scalegen.errors import UserError  # noqa: E402
from scalegen.eval.data import EvalData  # noqa: E402
from scalegen.eval.runner import evaluate  # noqa: E402


def small_cfg(**kw) -> EvalConfig:
    base = dict(
        num_samples=120,
        batch_size=64,
        probe_steps=40,
        probe_seeds=2,
        label_curve=[1, 5],
        labels_per_class=5,
        kid_subsets=5,
        kid_subset_size=60,
        is_splits=2,
    )
    return EvalConfig(**{**base, **kw})


def blob_data(spec, n_train=300, n_test=120) -> EvalData:
    return EvalData.from_arrays("blobs", spec, {"train": blobs(n_train, seed=0), "test": blobs(n_test, seed=1)})


def test_uniform_model_scores_exactly_8_bits_per_dim(tmp_path):
    model = make_model(FactorizedCategorical)  # zero logits: uniform over 256 levels
    res = evaluate(model, small_cfg(), blob_data(model.data_spec), tmp_path, metrics="bpd")
    bpd = res["metrics"]["bpd"]
    assert bpd["value"] == pytest.approx(8.0, abs=1e-5)  # float32 log-softmax round-off
    assert bpd["count"] == 120 and bpd["split"] == "test" and bpd["quantity"].startswith("exact")
    assert f"{bpd['value']:.3f}" == "8.000"


def test_factorized_categorical_scores_its_entropy_through_the_runner(tmp_path):
    model = make_model(FactorizedCategorical, shape=(1, 4, 4), levels=256)
    with torch.no_grad():
        model.logits.copy_(torch.randn(16, 256, generator=torch.Generator().manual_seed(0)) * 3)
    torch.manual_seed(1)
    x = model.sample(4000)
    data = EvalData.from_arrays("cat", model.data_spec, {"test": (x, torch.zeros(4000, dtype=torch.long))})
    bpd = evaluate(model, small_cfg(batch_size=1000), data, None, metrics=["bpd"])["metrics"]["bpd"]
    p = torch.softmax(model.logits.double(), -1)
    entropy_bits = float(-(p * p.log()).sum(-1).mean()) / math.log(2)
    assert abs(bpd["value"] - entropy_bits) < 4 * bpd["sem"]


def test_full_report(tmp_path):
    model = make_model(WithClassifier)
    x, y = blobs(300, seed=0)
    fit_to(model, x)
    model.fit_means(x, y)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"step": s, "val/bpd": 8 - s / 100} for s in (10, 20, 30)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    ckpt = {"path": "/x/last.ckpt", "sha256": "ab" * 32}
    res = evaluate(model, small_cfg(), blob_data(model.data_spec), out, checkpoint=ckpt, run_dir=run_dir, step=30)
    saved = json.loads((out / "metrics.json").read_text())
    m = saved["metrics"]
    assert set(m) >= {"bpd", "domain_fid", "domain_kid", "domain_is", "linear_probe", "semisup"}
    for name, entry in m.items():
        assert entry["definition"], name
    assert "fid" not in m and "SCALEGEN_INCEPTION_WEIGHTS" in saved["skipped"]["fid"]  # no weights here
    assert m["domain_fid"]["label"] == "domain FID (classifier trained on blobs)"
    assert m["domain_fid"]["num_samples"] == 120 and m["domain_fid"]["reference"]["count"] == 300
    assert m["domain_fid"]["reference"]["split"] == "train"
    assert m["linear_probe"]["sources"].keys() == {"model", "random_encoder", "pixels"}
    assert m["semisup"]["method"].startswith("the family's own classifier")
    assert set(m["semisup"]["curve"]["pixels"]) == {"1", "5"}
    assert m["semisup"]["curve"]["pixels"]["5"]["num_train"] == 50
    # blobs are linearly separable from pixels; the nearest-mean classifier is nearly perfect
    assert m["linear_probe"]["sources"]["pixels"]["accuracy_mean"] > 0.9
    assert m["semisup"]["value"] > 0.9
    assert saved["checkpoint"] == ckpt and saved["eval_config"]["num_samples"] == 120 and saved["step"] == 30
    for fig in ("samples.png", "bpd_curve.png", "probe_accuracy.png"):
        assert (out / fig).stat().st_size > 0, fig
    report = (out / "report.md").read_text()
    assert "domain FID (classifier trained on blobs)" in report and "120 samples vs 300 from the train split" in report
    assert "![probe_accuracy](probe_accuracy.png)" in report
    assert res["summary"]["eval/bpd"] == pytest.approx(m["bpd"]["value"])

    # Reference statistics are cached: a second evaluation reads the .npz.
    stats = list((Path(__import__("os").environ["SCALEGEN_CACHE"]) / "fid_stats").glob("blobs-train-domain_*.npz"))
    assert len(stats) == 1
    z = np.load(stats[0])
    assert {"mu", "sigma", "count", "data_checksum", "shards_checksum", "preprocessing_checksum"} <= set(z.files)
    assert int(z["count"]) == 300
    again = evaluate(model, small_cfg(), blob_data(model.data_spec), None, metrics="fid")
    assert again["metrics"]["domain_fid"]["value"] == pytest.approx(m["domain_fid"]["value"], rel=0.5)


def test_unknown_metric_is_a_user_error():
    model = make_model()
    with pytest.raises(UserError, match="unknown metric 'fdi'.*fid"):
        evaluate(model, small_cfg(), blob_data(model.data_spec), None, metrics="bpd,fdi")


def test_fid_without_a_feature_network_is_refused_before_any_metric_runs(tmp_path, monkeypatch):
    """RGB images (no domain classifier) and no Inception weights: one line naming where to get them, and
    raised before bits/dim is computed (the evaluation that would have failed at its end costs nothing)."""
    monkeypatch.delenv("SCALEGEN_INCEPTION_WEIGHTS", raising=False)
    model = make_model(shape=(3, 8, 8))
    calls, nll = [], model.nll
    monkeypatch.setattr(model, "nll", lambda *a, **k: calls.append(1) or nll(*a, **k))  # counts, then computes
    rgb = EvalData.from_arrays("rgb", model.data_spec, {"test": (torch.zeros(8, 3, 8, 8, dtype=torch.uint8),
                                                                 torch.zeros(8, dtype=torch.int64))})
    with pytest.raises(UserError, match=r"^FID/KID/IS need the Inception weights for this data: download .*; or "
                                        r"leave them out: --metrics bpd$"):
        evaluate(model, small_cfg(), rgb, tmp_path / "ev", metrics="bpd,fid")
    assert not calls and not (tmp_path / "ev").exists()
    evaluate(model, small_cfg(), rgb, tmp_path / "ev", metrics="bpd")  # the same data without FID evaluates
    assert calls
