"""VQ-VAE: straight-through gradients, the EMA codebook in closed form, dead-code restarts, and the
first stage and its PixelCNN prior trained, sampled and evaluated from their own checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from scalegen.cli.main import main
from scalegen.config.schema import OptimConfig
from scalegen.dataspec import DataSpec, images_to_unit
from scalegen.families.vqvae import VQVAE, VQVAEConfig
from scalegen.nets.vq import VectorQuantizer, assignment_statistics, nearest_codes, perplexity, straight_through
from scalegen.runtime import load_model


def _tiny(**kw) -> VQVAE:
    cfg = VQVAEConfig(hidden=[8, 8], res_blocks=1, code_dim=4, num_codes=16, **kw)
    return VQVAE(cfg, OptimConfig(), DataSpec(shape=(1, 8, 8)))


def test_straight_through_passes_decoder_gradients_to_the_encoder_unchanged() -> None:
    torch.manual_seed(0)
    model = _tiny()
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    z_e = model.encoder(images_to_unit(x))
    z_e.retain_grad()
    _, z_q = model.quantizer.quantize(z_e)
    assert not torch.equal(z_q, z_e)  # quantization moves the vectors, so the test is not trivial
    model.recon_nll(x, straight_through(z_e, z_q)).sum().backward()
    # Independently: the decoder's gradient at its input z_q, with z_q a leaf.
    leaf = z_q.detach().requires_grad_()
    model.recon_nll(x, leaf).sum().backward()
    assert torch.equal(z_e.grad, leaf.grad)
    # And the encoder's parameters get exactly that gradient pulled back through the encoder.
    enc_grads = [p.grad.clone() for p in model.encoder.parameters()]
    model.zero_grad()
    z_e2 = model.encoder(images_to_unit(x))
    expected = torch.autograd.grad(z_e2, list(model.encoder.parameters()), grad_outputs=leaf.grad)
    for got, want in zip(enc_grads, expected):
        torch.testing.assert_close(got, want)


def test_ema_update_matches_its_closed_form_and_converges_to_the_means() -> None:
    g = torch.Generator().manual_seed(0)
    q = VectorQuantizer(3, 2, ema=True, decay=0.9, eps=0.0)
    n0, m0 = q.count.clone(), q.ema_sum.clone()
    counts = torch.tensor([5.0, 2.0, 9.0])
    sums = torch.randn(3, 2, generator=g) * counts[:, None]
    steps = 7
    for _ in range(steps):
        q.ema_update(counts, sums)
    keep = 0.9**steps
    expected = (keep * m0 + (1 - keep) * sums) / (keep * n0 + (1 - keep) * counts)[:, None]
    torch.testing.assert_close(q.codebook, expected)
    # Real assignments: three well separated clusters; the codes end at the mean of their vectors.
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    z = (centres[:, None] + torch.randn(3, 50, 2, generator=g)).reshape(-1, 2)
    q = VectorQuantizer(3, 2, ema=True, decay=0.9, eps=1e-5)
    q.codebook.copy_(centres + 0.5)
    q.ema_sum.copy_(q.codebook)
    for _ in range(300):
        q.ema_update(*assignment_statistics(z, nearest_codes(z, q.codebook), 3))
    codes = nearest_codes(z, q.codebook)
    means = torch.stack([z[codes == k].mean(0) for k in range(3)])
    torch.testing.assert_close(q.codebook, means, atol=1e-4, rtol=0)


def test_smoothing_keeps_an_unused_code_finite() -> None:
    q = VectorQuantizer(4, 2, ema=True, decay=0.5, eps=1e-5)
    for _ in range(100):
        q.ema_update(torch.tensor([10.0, 10.0, 10.0, 0.0]), torch.ones(4, 2) * torch.tensor([10, 10, 10, 0.0])[:, None])
    assert torch.isfinite(q.codebook).all() and q.count[3] < 1e-20


def test_a_restarted_dead_code_gets_assigned_vectors() -> None:
    g = torch.Generator().manual_seed(0)
    q = VectorQuantizer(4, 2, ema=False, decay=0.9)
    z = torch.randn(200, 2, generator=g)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.5, 0.5], [-0.5, 0.5], [0.0, -0.5], [100.0, 100.0]]))  # code 3 far away
    for _ in range(100):
        counts, _ = assignment_statistics(z, nearest_codes(z, q.codebook.detach()), 4)
        assert counts[3] == 0
        q.track_usage(counts)
    dead = q.dead_codes(0.01)
    assert dead.tolist() == [False, False, False, True]
    q.restart(dead, z[:1])
    counts, _ = assignment_statistics(z, nearest_codes(z, q.codebook.detach()), 4)
    assert counts[3] >= 1 and not q.dead_codes(0.01).any()


def test_family_restarts_dead_codes_from_encoder_outputs_during_training() -> None:
    torch.manual_seed(0)
    model = _tiny(codebook="loss", restart_every=1, dead_code_threshold=0.5, init_from_data=False).train()
    with torch.no_grad():
        model.quantizer.codebook[5] = 1e3  # never the nearest code
        model.quantizer.count[5] = 0.0
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    model.loss({"x": x})
    z_e = model.encoder(images_to_unit(x)).detach().permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.cdist(model.quantizer.codebook[5:6].detach(), z_e).min() < 1e-6  # now an encoder output
    model.eval()
    codes = model.encode_codes(x)
    assert (codes == 5).any()


def test_perplexity_of_uniform_and_single_code_usage() -> None:
    assert perplexity(torch.ones(8) * 3).item() == pytest.approx(8.0)
    assert perplexity(torch.tensor([0.0, 7.0, 0.0])).item() == pytest.approx(1.0)


def test_first_stage_bound_adds_log_k_per_code() -> None:
    torch.manual_seed(0)
    model = _tiny().eval()
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    codes = model.encode_codes(x)
    recon = model.recon_nll(x, model.quantizer.lookup(codes))
    assert codes.shape == (3, 2, 2)
    torch.testing.assert_close(model.nll(x), recon + 4 * math.log(16))


def _eval(run: Path, out: Path, *extra: str) -> dict:
    assert main(["eval", str(run), "--out", str(out), "--no-wandb", *extra]) == 0  # `scalegen eval`, in this process
    return json.loads((out / "metrics.json").read_text())


def test_vqvae_and_its_prior_train_sample_and_evaluate_from_their_own_checkpoints(tmp_path: Path,
                                                                                  train_recipe) -> None:
    stage1 = train_recipe("vqvae/tiny", tmp_path / "vq")
    first = _eval(stage1, tmp_path / "eval1", "--metrics", "bpd")["metrics"]
    prior_run = train_recipe("vqvae/prior-tiny", tmp_path / "prior", f"model.stage1={stage1}")
    second = _eval(prior_run, tmp_path / "eval2", "--metrics", "bpd")["metrics"]
    # The learned prior beats the uniform one on held-out digits: a tighter two-stage bound.
    assert second["bpd"]["value"] < first["bpd"]["value"] - 0.05, (second["bpd"], first["bpd"])
    assert "bound" in second["bpd"]["quantity"]
    model, cfg = load_model(prior_run)
    assert cfg.model.stage1 == str(stage1)  # the prior's checkpoint names its first stage
    torch.manual_seed(0)
    samples = model.sample(6)
    assert samples.shape == (6, 1, 8, 8) and samples.dtype == torch.uint8
    codes = model.sample_codes(200)
    used = torch.bincount(codes.flatten(), minlength=model.num_codes)
    assert (used > 0).sum() > 4  # the prior draws a spread of codes, not one
