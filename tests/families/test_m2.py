"""M2: the unlabelled bound against a brute-force sum over the labels, the classifier against the same
network trained alone, and the tiny recipe trained and evaluated (its own classifier, analogies)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from scalegen.cli.main import main
from scalegen.config.schema import OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.families.m2 import M2, M2Config
from scalegen.nets.mlp import MLP

SPEC = DataSpec(shape=(1, 8, 8), num_classes=10)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8)).unsqueeze(1)
    return x, torch.from_numpy(d.target).long()


def test_unlabelled_bound_equals_the_label_marginalized_bound_by_brute_force() -> None:
    torch.manual_seed(0)
    model = M2(M2Config(hidden=[32], latent_dim=4), OptimConfig(), SPEC).eval()
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    f = model.features(x)
    eps = torch.randn(5, 10, 4)
    u = model.unlabelled_bound(f, eps)
    # Brute force, from the networks alone: for each label y, L(x, y) = log p(x|y,z) + log p(y) - KL with the
    # same z = mu + sigma eps; then sum_y q(y|x) (L(x, y) - log q(y|x)).
    with torch.no_grad():
        q = F.softmax(model.classifier(f), 1)
        total = torch.zeros(5)
        for y in range(10):
            onehot = F.one_hot(torch.full((5,), y), 10).float()
            mu, logvar = model.encoder(torch.cat([f, onehot], 1)).chunk(2, 1)
            z = mu + eps[:, y] * torch.exp(0.5 * logvar)
            logits = model.decoder(torch.cat([z, onehot], 1))
            log_px = (f * F.logsigmoid(logits) + (1 - f) * F.logsigmoid(-logits)).sum(1)
            kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
            bound_y = log_px - math.log(10) - kl
            total += q[:, y] * (bound_y - torch.log(q[:, y]))
    torch.testing.assert_close(u.detach(), total, rtol=1e-5, atol=1e-4)
    # And -U is above the importance-weighted bound with k = 500 (both bound -log p(x); IWAE is tighter).
    with torch.no_grad():
        draws = torch.stack([model.nll(x) for _ in range(200)])
        elbo, stderr = draws.mean(0), draws.std(0) / math.sqrt(200)
        assert (model.nll(x, k=500) <= elbo + 3 * stderr).all()


def test_loss_uses_the_labelled_bound_for_labelled_examples_and_u_for_the_rest() -> None:
    torch.manual_seed(0)
    model = M2(M2Config(hidden=[32], latent_dim=4, alpha_factor=0.0), OptimConfig(), SPEC).eval()
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([3, -1, 7, -1, -1, 0])
    torch.manual_seed(1)
    loss, logs = model.loss({"x": x, "y": y})
    f = model.features(x)
    torch.manual_seed(1)  # the same draws as loss() makes: one eps per (example, label) pair
    eps = torch.randn(6, 10, 4)
    known = y >= 0
    lab = model.labelled_bound(f[known], y[known], eps[known, y[known]])  # each row's own label's draw
    unl = model.unlabelled_bound(f[~known], eps[~known])
    expected = -(lab.sum() + unl.sum()) / 6
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["labelled_in_batch"].item() == pytest.approx(0.5)


class _Classifier(L.LightningModule):
    """The same classifier network as M2's q(y|x), trained alone with cross-entropy."""

    def __init__(self, hidden: list[int]) -> None:
        super().__init__()
        self.net = MLP(64, hidden, 10)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        f = (batch["x"].flatten(1).float() / 255 > 0.5).float()
        return F.cross_entropy(self.net(f), batch["y"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _fit(module: L.LightningModule, batches: list[dict], epochs: int) -> None:
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))


def test_fully_labelled_m2_classifier_trains_like_a_plain_classifier() -> None:
    """Every example labelled and alpha large: q(y|x) is trained by the classification term alone (the labelled
    bound does not involve it), so it must reach the accuracy of the same network trained alone."""
    x, y = _digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1297], perm[1297:]
    batches = [{"x": x[i], "y": y[i]} for i in train.split(64)]
    torch.manual_seed(0)
    m2 = M2(M2Config(hidden=[64], latent_dim=4, alpha_factor=100.0, binarize="threshold"), OptimConfig(lr=1e-3),
            SPEC)
    _fit(m2, batches, epochs=15)
    torch.manual_seed(0)
    plain = _Classifier([64])
    _fit(plain, batches, epochs=15)
    with torch.no_grad():
        acc_m2 = (m2.eval().classify(x[test]).argmax(1) == y[test]).float().mean().item()
        f = (x[test].flatten(1).float() / 255 > 0.5).float()
        acc_plain = (plain.net(f).argmax(1) == y[test]).float().mean().item()
    assert acc_plain > 0.85, acc_plain  # the reference learned (chance is 0.1)
    assert abs(acc_m2 - acc_plain) < 0.03, (acc_m2, acc_plain)  # 3 points on 500 test digits


def test_sample_draws_the_asked_labels_and_analogies_shape() -> None:
    torch.manual_seed(0)
    model = M2(M2Config(hidden=[32], latent_dim=4), OptimConfig(), SPEC).eval()
    s = model.sample(4, torch.tensor([1, 2, 3, 4]))
    assert s.shape == (4, 1, 8, 8) and s.dtype == torch.uint8
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    a = model.analogies(x)
    assert a.shape == (3, 10, 1, 8, 8)
    # Decoding the same style with the same label is the same image: column y of row i.
    z, _ = model._style(x)
    out = model.decoder(torch.cat([z, F.one_hot(torch.full((3,), 6), 10).float()], 1))
    assert torch.equal(a[:, 6], model.decode_mean(out))


def test_m2_tiny_recipe_trains_and_evaluates_with_its_own_classifier(tmp_path: Path, train_recipe) -> None:
    run = train_recipe("m2/tiny", tmp_path / "m2")
    out = tmp_path / "eval"
    budget = ["eval.probe_seeds=1", "eval.probe_steps=50", "eval.label_curve=[10]"]  # the classifier is the point
    assert main(["eval", str(run), "--out", str(out), "--no-wandb", "--metrics", "bpd,semisup", *budget]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert "classify" in metrics["semisup"]["method"]
    assert metrics["semisup"]["value"] > 0.5, metrics["semisup"]  # 100 labels, 3 epochs; chance is 0.1
    assert metrics["bpd"]["value"] < 1.0  # bits/dim of the binarized digits, a bound; uniform is 1 bit
    assert (out / "analogies.png").exists()


@pytest.mark.slow  # trains the quickstart VAE (shared fixture), then M1+M2 over it, and evaluates
def test_m1m2_trains_over_a_frozen_m1_and_evaluates_from_its_own_checkpoint(tmp_path: Path, train_recipe,
                                                                            trained_vae: Path) -> None:
    from scalegen.checkpoints import load_model

    run = train_recipe("m2/m1m2-tiny", tmp_path / "m1m2", f"model.stage1={trained_vae}")
    model, cfg = load_model(run)
    m1, _ = load_model(trained_vae)
    for name, p in m1.state_dict().items():  # the first stage stayed frozen through training
        torch.testing.assert_close(model.stage1.state_dict()[name], p)
    x, y = _digits()
    torch.testing.assert_close(model.features(x[:8]), m1.encode(x[:8]))  # M2 is evaluated on M1's posterior means
    torch.manual_seed(0)
    drawn = model.features(x[:8], train=True)  # and trained on draws from q(z1|x)
    torch.manual_seed(0)
    torch.testing.assert_close(drawn, m1.encode_sample(x[:8]))
    assert not torch.allclose(drawn, m1.encode(x[:8]))
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--out", str(out), "--no-wandb", "eval.probe_seeds=1", "eval.probe_steps=50",
                 "eval.label_curve=[10]"]) == 0  # `scalegen eval`, in this process
    semisup = json.loads((out / "metrics.json").read_text())["metrics"]["semisup"]
    assert "classify" in semisup["method"] and semisup["value"] > 0.5, semisup
    assert model.sample(4, torch.tensor([0, 1, 2, 3])).shape == (4, 1, 8, 8)


@pytest.mark.parametrize("recipe", ["m2/mnist-100", "m2/mnist-600", "m2/m1m2-mnist-600"])
def test_mnist_recipes_compare_the_classifier_with_probes_on_as_many_labels(recipe: str) -> None:
    from scalegen.config import load_config

    cfg = load_config(recipe, ["data.labels_per_class=7"])  # an override follows through to the baselines
    assert cfg.eval.labels_per_class == 7
    assert load_config(recipe).eval.labels_per_class == load_config(recipe).data.labels_per_class
