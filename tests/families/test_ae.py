"""Autoencoders: a linear AE recovers the PCA subspace; corruption, sparsity and the recipe end to end."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.datasets import load_digits

from scalegen.cli.main import main
from scalegen.config.schema import OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.families.ae import AEConfig, Autoencoder, topk_code


def _digits_uint8() -> torch.Tensor:
    d = load_digits()
    return torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8)).unsqueeze(1)


def test_linear_autoencoder_spans_the_pca_subspace() -> None:
    """Baldi & Hornik 1989: the squared-error optimum of a linear AE with k hidden units projects onto the
    top-k principal subspace. The decoder's columns must span the same subspace as PCA's top 4 directions
    (the 4th and 5th eigenvalues of the digits differ by 40 %, so the subspace is well defined)."""
    torch.manual_seed(0)
    x = _digits_uint8()
    k = 4
    model = Autoencoder(AEConfig(net="linear", code_dim=k, recon="mse"), OptimConfig(lr=3e-2),
                        DataSpec(shape=(1, 8, 8)))
    loader = torch.utils.data.DataLoader([{"x": x}], batch_size=None)  # one full batch, re-used every epoch
    trainer = L.Trainer(max_steps=800, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, loader)
    flat = x.flatten(1).double().numpy() / 255
    centred = flat - flat.mean(0)
    eig = np.linalg.eigvalsh(np.cov(centred.T))[::-1]
    assert eig[k - 1] / eig[k] > 1.3  # the subspace is identifiable (the premise of the test)
    pcs = np.linalg.svd(centred, full_matrices=False)[2][:k].T  # [64, k]
    decoder = model.decoder.net[0].weight.detach().double().numpy()  # [64, k]
    angles = scipy.linalg.subspace_angles(decoder, pcs)
    assert angles.max() < 0.05, np.degrees(angles)  # radians; every principal angle under ~3 degrees
    # And not by construction: a random k-dimensional subspace is far from it.
    rand = np.random.default_rng(0).standard_normal((64, k))
    assert scipy.linalg.subspace_angles(rand, pcs).max() > 0.5


def test_topk_keeps_the_k_largest_entries() -> None:
    h = torch.tensor([[0.5, -2.0, 3.0, 1.0, 0.2]])
    assert torch.equal(topk_code(h, 2), torch.tensor([[0.0, 0.0, 3.0, 1.0, 0.0]]))


@pytest.mark.parametrize("denoise", ["gaussian", "mask"])
def test_corruption_only_in_training(denoise: str) -> None:
    torch.manual_seed(0)
    model = Autoencoder(AEConfig(denoise=denoise, noise_std=0.5, mask_prob=0.5), OptimConfig(),
                        DataSpec(shape=(1, 8, 8)))
    x01 = torch.rand(64, 1, 8, 8)
    corrupted = model._corrupt(x01)
    if denoise == "gaussian":
        assert abs((corrupted - x01).std().item() - 0.5) < 0.03
    else:
        assert abs((corrupted == 0).float().mean().item() - 0.5) < 0.03
    x = (x01 * 255).to(torch.uint8)
    model.eval()
    a, b = model.loss({"x": x})[0], model.loss({"x": x})[0]
    assert a == b  # validation reconstructs the clean input: deterministic


def test_l1_penalty_enters_the_loss() -> None:
    torch.manual_seed(0)
    model = Autoencoder(AEConfig(sparsity="l1", l1_weight=0.1), OptimConfig(), DataSpec(shape=(1, 8, 8))).eval()
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    loss, logs = model.loss({"x": x})
    assert loss.item() == pytest.approx((logs["recon"] + 0.1 * logs["code_l1"]).item(), rel=1e-6)
    h = model.encode(x)
    assert logs["code_l1"].item() == pytest.approx(h.abs().sum(1).mean().item(), rel=1e-6)


def test_ae_tiny_recipe_trains_and_evaluates(tmp_path: Path, train_recipe) -> None:
    run = train_recipe("ae/tiny", tmp_path / "ae")
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--out", str(out), "--no-wandb", "--metrics", "linear_probe",
                 "eval.probe_seeds=1"]) == 0  # `scalegen eval`, in this process
    metrics = json.loads((out / "metrics.json").read_text())
    assert "bpd" not in metrics["metrics"]  # no likelihood
    probe = metrics["metrics"]["linear_probe"]
    assert probe["value"] > 0.8, probe  # digits codes are linearly separable well above chance (0.1)
    assert (out / "reconstructions.png").exists()
