"""PixelCNN / Gated PixelCNN: causality by gradients, exact NLL, sampling, class conditioning."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.autograd.functional import jacobian

from scalegen.config.schema import OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.families.pixelcnn import PixelCNNConfig, PixelCNNModel
from scalegen.nets.pixelcnn import GatedPixelCNN, PixelCNN
from scalegen.objectives.autoregressive import binarize
from scalegen.samplers.autoregressive import sample_image


def _dependencies(net: torch.nn.Module, c: int, h: int, w: int) -> torch.Tensor:
    """dep[co, r, col, ci, r2, col2]: do the logits at (co, r, col) depend on input (ci, r2, col2)?"""
    torch.manual_seed(0)
    dep = torch.zeros(c, h, w, c, h, w, dtype=torch.bool)
    for _ in range(12):  # union over inputs: a ReLU can hide a dependence at one input point
        x = torch.rand(1, c, h, w, dtype=torch.float64) * 2 - 1
        jac = jacobian(lambda v: net.forward_float(v.view(1, c, h, w)).sum(1)[0], x.view(-1))
        dep |= (jac.abs() > 0).view(c, h, w, c, h, w)
    return dep


@pytest.mark.parametrize("arch", ["pixelcnn", "gated"])
@pytest.mark.parametrize("channels", [1, 3])
def test_causality_by_gradients(arch, channels):
    """Sub-pixel (co, r, col) depends on no input at or after it in raster/RGB order."""
    h = w = 5
    cls = GatedPixelCNN if arch == "gated" else PixelCNN
    net = cls(channels, 256, hidden=12, num_layers=3, kernel_size=3, first_kernel_size=3,
              out_hidden=24).double()
    dep = _dependencies(net, channels, h, w)
    for co in range(channels):
        for r in range(h):
            for col in range(w):
                d = dep[co, r, col]
                flat = d.any(0).view(-1)
                i = r * w + col
                assert not flat[i + 1:].any(), f"pixel {(r, col)} sees a later pixel"
                assert not d[co:, r, col].any(), f"channel {co} at {(r, col)} sees itself or a later channel"
                assert d[:co, r, col].all(), f"channel {co} at {(r, col)} misses an earlier channel"


@pytest.mark.parametrize("channels,first_kernel", [(1, 3), (3, 3), (1, 5)])
def test_gated_has_no_blind_spot(channels, first_kernel):
    """Gated: output at i depends on EVERY pixel < i inside the receptive field (and on nothing else)."""
    h = w = 7
    net = GatedPixelCNN(channels, 256, hidden=12, num_layers=2, kernel_size=3, first_kernel_size=first_kernel,
                        out_hidden=24).double()
    dep = _dependencies(net, channels, h, w)
    for r in range(h):
        for col in range(w):
            seen = dep[:, r, col].any(0).any(0).clone()  # [H, W], any output / input channel
            seen[r, col] = False  # the pixel's own earlier channels: checked in test_causality_by_gradients
            expected = torch.zeros(h, w, dtype=torch.bool)
            for rr, cc in net.receptive_field(r, col, h, w):
                expected[rr, cc] = True
            assert torch.equal(seen, expected), f"pixel {(r, col)}:\n{seen.int()}\n{expected.int()}"
            for rr, cc in net.receptive_field(r, col, h, w):  # every channel of every earlier pixel
                assert dep[:, r, col, :, rr, cc].all()


def test_plain_pixelcnn_blind_spot_is_detected():
    """The same check fails for the plain PixelCNN: it misses the up-right pixels (2016b Fig. 1)."""
    net = PixelCNN(1, 256, hidden=6, num_layers=2, kernel_size=3, first_kernel_size=3, out_hidden=12).double()
    dep = _dependencies(net, 1, 7, 7)
    seen = dep[0, 4, 3, 0]
    assert seen[3, 4] and not seen[2, 6], seen.int()  # 3 layers of 3x3: (r-2, c+3) is in range yet unseen


def _per_pixel_nll(net, target: torch.Tensor, y: torch.Tensor | None, levels: int) -> torch.Tensor:
    """-sum_i log p(x_i | x_<i), each conditional from its own pass with x_>=i replaced by noise."""
    b, c, h, w = target.shape
    g = torch.Generator().manual_seed(0)
    total = torch.zeros(b, dtype=torch.float64)
    order = [(r, col, ch) for r in range(h) for col in range(w) for ch in range(c)]
    for k, (r, col, ch) in enumerate(order):
        corrupted = target.clone()
        for r2, col2, ch2 in order[k:]:
            corrupted[:, ch2, r2, col2] = torch.randint(0, levels, (b,), generator=g).to(target.dtype)
        logits = net(corrupted, y)[:, :, ch, r, col].double()
        xi = target[:, ch, r, col].long()
        if logits.shape[1] == 1:
            bce = torch.nn.functional.binary_cross_entropy_with_logits
            logp = -bce(logits[:, 0], xi.double(), reduction="none")
        else:
            logp = torch.log_softmax(logits, 1).gather(1, xi[:, None])[:, 0]
        total -= logp
    return total


@pytest.mark.parametrize(
    "arch,output,channels,conditional",
    [("gated", "softmax", 3, False), ("pixelcnn", "softmax", 3, True), ("gated", "binary", 1, True),
     ("pixelcnn", "binary", 1, False)],
)
def test_exact_nll_equals_sum_of_conditionals(arch, output, channels, conditional):
    torch.manual_seed(0)
    cfg = PixelCNNConfig(architecture=arch, output=output, hidden_channels=6, num_layers=2, kernel_size=3,
                         first_kernel_size=3, out_hidden_channels=12, conditional=conditional)
    model = PixelCNNModel(cfg, OptimConfig(), DataSpec(kind="image", shape=(channels, 4, 4))).double().eval()
    x = torch.randint(0, 256, (3, channels, 4, 4), dtype=torch.uint8)
    y = torch.tensor([0, 7, -1])
    target = binarize(x) if output == "binary" else x
    with torch.no_grad():
        nll = model.nll(x, y)
        levels = 2 if output == "binary" else 256
        expected = _per_pixel_nll(model.net, target, y if conditional else None, levels)
    torch.testing.assert_close(nll.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["pixelcnn", "gated"])
def test_greedy_ancestral_sample_is_argmax_of_its_own_conditionals(arch):
    torch.manual_seed(0)
    cls = GatedPixelCNN if arch == "gated" else PixelCNN
    net = cls(3, 256, hidden=6, num_layers=2, kernel_size=3, first_kernel_size=3, out_hidden=12).eval()
    x = sample_image(net, (3, 4, 4), 2, temperature=0.0)
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 4, 4)
    assert torch.equal(net(x).argmax(1).to(torch.uint8), x)
    warm = sample_image(net, (3, 4, 4), 64, temperature=1.0)
    assert len({tuple(s.flatten().tolist()) for s in warm}) > 60  # stochastic draws differ


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return (torch.tensor(np.clip(d.images * 16, 0, 255), dtype=torch.uint8).unsqueeze(1),
            torch.tensor(d.target, dtype=torch.long))


def _fit(model, x, y, steps, tmp_path):
    batches = [{"x": x[i:i + 64], "y": y[i:i + 64]} for i in range(0, len(x) - 63, 64)]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None, shuffle=True))
    return model.eval()


@pytest.mark.parametrize("arch,output", [("gated", "softmax"), ("pixelcnn", "binary")])
def test_short_run_lowers_nll_and_samples(arch, output, tmp_path):
    torch.manual_seed(0)
    x, y = _digits()
    cfg = PixelCNNConfig(architecture=arch, output=output, hidden_channels=16, num_layers=2,
                         out_hidden_channels=32)
    model = PixelCNNModel(cfg, OptimConfig(lr=3e-3), DataSpec(kind="image", shape=(1, 8, 8))).eval()
    held = x[1500:1700]
    with torch.no_grad():
        before = float(model.nll(held).mean())
    _fit(model, x[:1280], y[:1280], 40, tmp_path)
    with torch.no_grad():
        after = float(model.nll(held).mean())
    assert after < 0.7 * before, (before, after)
    s = model.sample(3)
    assert s.shape == (3, 1, 8, 8) and s.dtype == torch.uint8
    if output == "binary":
        assert set(s.unique().tolist()) <= {0, 255}


def test_class_conditioning_uses_the_label(tmp_path):
    """After a short conditional run, held-out digits are likelier under their own label than a wrong one."""
    torch.manual_seed(0)
    x, y = _digits()
    cfg = PixelCNNConfig(architecture="gated", hidden_channels=16, num_layers=2, out_hidden_channels=32,
                         conditional=True, output="binary")
    model = PixelCNNModel(cfg, OptimConfig(lr=3e-3), DataSpec(kind="image", shape=(1, 8, 8), num_classes=10))
    _fit(model, x[:1280], y[:1280], 120, tmp_path)
    held_x, held_y = x[1500:1700], y[1500:1700]
    with torch.no_grad():
        right = float(model.nll(held_x, held_y).mean())
        wrong = float(model.nll(held_x, (held_y + 5) % 10).mean())
    assert right < wrong - 2.0, (right, wrong)  # nats per image
    assert model.sample(10).shape == (10, 1, 8, 8)  # classes 0..9 by default


@pytest.mark.parametrize("arch", ["pixelcnn", "gated"])
def test_bf16_autocast_loss_matches_float32(arch):
    torch.manual_seed(0)
    cfg = PixelCNNConfig(architecture=arch, hidden_channels=12, num_layers=2, out_hidden_channels=24)
    model = PixelCNNModel(cfg, OptimConfig(), DataSpec(kind="image", shape=(3, 8, 8)))
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    ref, _ = model.loss({"x": x})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = model.loss({"x": x})
    assert low.dtype == torch.float32
    assert abs(float(low) - float(ref)) < 0.02, (float(low), float(ref))
    low.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
