"""The reconstruction-error metric through the runner, against the error computed by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_models import FactorizedCategorical, blobs, make_model  # noqa: E402

from scalegen.config.schema import EvalConfig, OptimConfig  # noqa: E402
from scalegen.dataspec import DataSpec  # noqa: E402
from scalegen.eval.data import EvalData  # noqa: E402
from scalegen.eval.runner import evaluate, parse_metrics  # noqa: E402
from scalegen.families.ae import AEConfig, Autoencoder  # noqa: E402


def test_autoencoder_reconstruction_error_matches_a_hand_computation(tmp_path: Path) -> None:
    spec = DataSpec(kind="image", shape=(1, 8, 8), num_classes=10, levels=256)
    torch.manual_seed(0)
    model = Autoencoder(AEConfig(hidden=[32], code_dim=8), OptimConfig(), spec).eval()
    x, y = blobs(50, seed=1)
    data = EvalData.from_arrays("blobs", spec, {"test": (x, y), "train": blobs(50, seed=0)})
    assert "reconstruction" in parse_metrics([], model)  # on by default for families that reconstruct
    res = evaluate(model, EvalConfig(batch_size=16), data, tmp_path, metrics="reconstruction")
    entry = res["metrics"]["reconstruction"]
    with torch.no_grad():
        per_image = ((model.reconstruct(x).double() - x.double()) / 255).pow(2).mean((1, 2, 3))
    assert entry["count"] == 50 and entry["unit"] == "MSE"
    assert abs(entry["value"] - float(per_image.mean())) < 1e-9
    assert abs(entry["sem"] - float(per_image.std() / 50**0.5)) < 1e-9
    assert 0 < entry["value"] < 1
    saved = json.loads((tmp_path / "metrics.json").read_text())["metrics"]["reconstruction"]
    assert saved["value"] == entry["value"]
    assert "reconstruction" in (tmp_path / "report.md").read_text()


def test_families_that_do_not_reconstruct_skip_it(tmp_path: Path) -> None:
    model = make_model(FactorizedCategorical)
    data = EvalData.from_arrays("blobs", model.data_spec, {"test": blobs(20, seed=1)})
    res = evaluate(model, EvalConfig(), data, None, metrics="reconstruction")
    assert "reconstruction" not in res["metrics"]
    assert res["skipped"]["reconstruction"] == "the family does not reconstruct"
    assert "reconstruction" not in parse_metrics([], model)
