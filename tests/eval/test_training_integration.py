"""The evaluation pipeline on real training: the VAE's bounds, `scalegen eval`, and PeriodicEval."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_models import blobs, make_model  # noqa: E402

from scalegen.callbacks.periodic_eval import PeriodicEval  # noqa: E402
from scalegen.config.schema import Config, EvalConfig  # noqa: E402
from scalegen.eval.data import EvalData  # noqa: E402
from scalegen.runtime.metrics_file import JsonLinesLogger  # noqa: E402


def test_vae_elbo_bpd_bounds_iwae_which_does_not_increase_with_k(trained_vae):
    from scalegen.eval.runner import evaluate
    from scalegen.runtime import load_model

    model, cfg = load_model(trained_vae)
    assert model.nll_kind == "elbo"
    data = EvalData.from_config(cfg.data)
    bpd = {}
    for k in (10, 100):
        torch.manual_seed(0)
        ec = EvalConfig(iwae_k=k, max_examples=200, batch_size=100, seed=0)
        m = evaluate(model, ec, data, None, metrics="bpd")["metrics"]
        assert m["bpd"]["quantity"].startswith(f"negative IWAE-{k} bound") and m["bpd"]["count"] == 200
        bpd[k], bpd[1] = m["bpd"]["value"], m["bpd_elbo"]["value"]
    # Upper bounds on the same 200 test images: ELBO >= IWAE-10 >= IWAE-100 (up to Monte-Carlo noise).
    assert bpd[1] >= bpd[10] - 1e-3 and bpd[10] >= bpd[100] - 1e-3, bpd
    assert bpd[1] - bpd[100] > 1e-3, bpd  # and the gap is real


def test_scalegen_eval_cli_on_a_checkpoint(trained_vae, tmp_path):
    from scalegen.cli.main import main

    out = tmp_path / "eval"
    rc = main(
        [
            "eval",
            str(trained_vae),
            "eval.iwae_k=5",
            "eval.max_examples=100",
            "eval.num_samples=100",
            "eval.probe_steps=30",
            "eval.probe_seeds=2",
            "eval.label_curve=[1,10]",
            "eval.kid_subset_size=50",
            "eval.kid_subsets=5",
            "--metrics",
            "bpd,fid,kid,is,linear_probe,semisup",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    saved = json.loads((out / "metrics.json").read_text())
    ckpt = Path(saved["checkpoint"]["path"])
    import hashlib

    assert saved["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert set(saved["metrics"]) >= {
        "bpd",
        "bpd_elbo",
        "domain_fid",
        "domain_kid",
        "domain_is",
        "linear_probe",
        "semisup",
    }
    assert saved["metrics"]["domain_fid"]["label"] == "domain FID (classifier trained on digits)"
    assert saved["config"]["model"]["family"] == "vae" and saved["eval_config"]["iwae_k"] == 5
    for fig in ("samples.png", "reconstructions.png", "bpd_curve.png", "probe_accuracy.png"):
        assert (out / fig).is_file(), fig
    assert "negative IWAE-5 bound" in (out / "report.md").read_text()


def test_cli_errors_are_one_line(tmp_path, capsys):
    from scalegen.cli.main import main

    assert main(["eval", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        for i in range(0, len(self.x), 50):
            yield {"x": self.x[i : i + 50], "y": self.y[i : i + 50]}


def test_periodic_eval_logs_to_the_trainers_loggers(tmp_path):
    model = make_model()
    x, y = blobs(200, seed=0)
    cfg = Config()
    cfg.eval = EvalConfig(
        every_n_steps=2, metrics=["bpd", "linear_probe"], max_examples=60, probe_steps=20, probe_seeds=1
    )
    data = EvalData.from_arrays("blobs", model.data_spec, {"train": (x, y), "test": blobs(60, seed=1)})
    callback = PeriodicEval(cfg, data=data)
    logger = JsonLinesLogger(tmp_path / "metrics.jsonl")
    trainer = L.Trainer(
        max_steps=4,
        logger=[logger],
        callbacks=[callback],
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(model, torch.utils.data.DataLoader(_Batches(x, y), batch_size=None))
    assert [h["step"] for h in callback.history] == [2, 4]
    for step in (2, 4):
        saved = json.loads((tmp_path / "eval" / f"step-{step:07d}" / "metrics.json").read_text())
        assert saved["step"] == step and set(saved["metrics"]) == {"bpd", "linear_probe"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "eval/bpd" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert "eval/linear_probe/pixels" in logged[0]
    assert model.training  # training mode restored


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
