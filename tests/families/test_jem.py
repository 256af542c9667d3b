"""JEM: the classifier/energy identities, the loss's parts, and the tiny recipe trained for real and evaluated
by `scalegen eval` (accuracy, ECE with its reliability diagram, OOD AUROC), each number recomputed here
independently from the model's outputs (scikit-learn for the AUROC)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from scalegen.cli.main import main
from scalegen.config.schema import DataConfig, OptimConfig
from scalegen.dataspec import DataSpec, images_to_unit
from scalegen.eval.data import EvalData
from scalegen.families.jem import JEM, JEMConfig
from scalegen.metrics.ood import corrupt
from scalegen.runtime import load_model


def _model(**kw) -> JEM:
    torch.manual_seed(0)
    return JEM(JEMConfig(widths=[8, 16], sgld_steps=2, buffer_size=20, **kw), OptimConfig(), DataSpec(shape=(1, 8, 8)))


def test_classifier_and_energy_identities() -> None:
    """log p(y|x) = f(x)[y] - logsumexp f(x) = f(x)[y] + E(x), and p(y|x) sums to one."""
    model = _model()
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        f, log_p, e = model.logits(x), model.classify(x), model.energy(x)
        torch.testing.assert_close(log_p, f + e[:, None])
        torch.testing.assert_close(log_p.exp().sum(1), torch.ones(6))
        torch.testing.assert_close(model.energy(images_to_unit(x)), e)  # floats in [-1, 1] or uint8


def test_loss_is_cross_entropy_on_labelled_rows_plus_the_ml_term() -> None:
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([3, -1, 0, -1, 9, 1])
    plain = _model(gen_weight=0.0)
    loss, logs = plain.loss({"x": x, "y": y})
    keep = y >= 0
    torch.testing.assert_close(loss, F.cross_entropy(plain.logits(x[keep]), y[keep]))
    assert "contrastive" not in logs
    joint = _model(gen_weight=1.0)
    loss, logs = joint.loss({"x": x, "y": y})
    torch.testing.assert_close(loss, logs["ce"] + logs["contrastive"])  # energy_reg is 0 for JEM
    loss.backward()
    assert all(p.grad is not None for p in joint.parameters())


def test_tiny_jem_trains_and_eval_reports_accuracy_ece_and_ood(tmp_path: Path, train_recipe) -> None:
    run = train_recipe("jem/tiny", tmp_path / "jem", "trainer.max_epochs=4")
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--out", str(out), "--no-wandb", "eval.metrics=[accuracy,ece,ood]"]) == 0
    results = json.loads((out / "metrics.json").read_text())
    m = results["metrics"]
    assert (out / "reliability.png").is_file()
    # Recompute from the model's own outputs on the same split.
    model, cfg = load_model(run / "checkpoints" / "last.ckpt")
    x, y = EvalData.from_config(cfg.data).split("test", None)
    with torch.no_grad():
        log_p = model.classify(x)
    acc = (log_p.argmax(1) == y).float().mean().item()
    assert m["accuracy"]["value"] == pytest.approx(acc, abs=1e-6) and acc > 0.5
    assert 0 <= m["ece"]["value"] <= 1 and sum(m["ece"]["bin_counts"]) == len(y)
    with torch.no_grad():
        s_in = -model.energy(images_to_unit(x)).numpy()
        s_out = -model.energy(images_to_unit(corrupt(x, "inverted", seed=cfg.eval.seed))).numpy()
    ref = roc_auc_score(np.r_[np.ones(len(s_in)), np.zeros(len(s_out))], np.r_[s_in, s_out])
    assert m["ood"]["auroc"]["inverted"]["log_px"] == pytest.approx(ref, abs=1e-6)
    assert set(m["ood"]["auroc"]) == {"uniform_noise", "pixel_permuted", "inverted"}
    assert set(m["ood"]["auroc"]["inverted"]) == {"log_px", "grad_norm", "max_softmax"}
    # The report carries the three numbers, the AUROC of every corruption and score, and the diagram.
    report = (out / "report.md").read_text()
    assert f"| accuracy | {m['accuracy']['value']:.4f} |" in report and f"| ece | {m['ece']['value']:.4f} |" in report
    a = m["ood"]["auroc"]["inverted"]
    assert f"| inverted | {a['grad_norm']:.3f} | {a['log_px']:.3f} | {a['max_softmax']:.3f} |" in report
    assert "![reliability](reliability.png)" in report


def test_ood_against_another_prepared_dataset(tmp_path: Path, train_recipe) -> None:
    """eval.ood_data: a packed folder of 16x16 colour PNGs, brought to the digits' 1x8x8, is one more
    negative set; its AUROC equals the one computed from the model's energies on the same converted images."""
    from PIL import Image

    from scalegen.metrics.ood import match_images

    src = tmp_path / "src"
    src.mkdir()
    g = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(g.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / f"{i:03d}.png")
    assert main(["data", "pack", str(src), "--out", str(tmp_path / "other"), "--test-fraction", "0.5"]) == 0
    run = train_recipe("jem/tiny", tmp_path / "jem", "trainer.max_epochs=1")
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--out", str(out), "--no-wandb", "eval.metrics=[ood]",
                 f"eval.ood_data={tmp_path / 'other'}"]) == 0
    m = json.loads((out / "metrics.json").read_text())["metrics"]["ood"]
    name = next(k for k in m["auroc"] if k.startswith("dataset:"))
    model, cfg = load_model(run / "checkpoints" / "last.ckpt")
    x, _ = EvalData.from_config(cfg.data).split("test", None)
    other = EvalData.from_config(OmegaConf.structured(DataConfig(root=str(tmp_path / "other"))))
    x_out = match_images(other.split("test", None)[0], (1, 8, 8))
    with torch.no_grad():
        s_in, s_out = -model.energy(images_to_unit(x)).numpy(), -model.energy(images_to_unit(x_out)).numpy()
    ref = roc_auc_score(np.r_[np.ones(len(s_in)), np.zeros(len(s_out))], np.r_[s_in, s_out])
    assert m["auroc"][name]["log_px"] == pytest.approx(ref, abs=1e-6)
    assert len(m["auroc"]) == 4
    assert main(["eval", str(run), "--out", str(tmp_path / "e2"), "--no-wandb", "eval.metrics=[ood]",
                 f"eval.ood_data={tmp_path / 'missing'}"]) == 2
