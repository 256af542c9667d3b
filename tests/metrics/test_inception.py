"""The FID InceptionV3: exact state-dict layout of pt_inception-2015-12-05-6726825d.pth, weight loading.

The real weights are not on these machines (../shared/datasets/README.md). The tests write a state
dict with the reference file's key names and shapes, filled with seeded random values, from a
layout table written here independently of scalegen's module (torchvision's Inception3 trunk with
num_classes=1008 and no auxiliary head, which is what pytorch-fid loads the file into).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from scalegen.errors import UserError
from scalegen.metrics.inception import (
    FEATURE_DIM,
    NUM_CLASSES,
    FIDInceptionV3,
    load_inception,
    resolve_weights,
)
from scalegen.metrics.weights import fetch


def _block_a(p, cin, pool):
    return [
        (f"{p}.branch1x1", cin, 64, 1, 1),
        (f"{p}.branch5x5_1", cin, 48, 1, 1),
        (f"{p}.branch5x5_2", 48, 64, 5, 5),
        (f"{p}.branch3x3dbl_1", cin, 64, 1, 1),
        (f"{p}.branch3x3dbl_2", 64, 96, 3, 3),
        (f"{p}.branch3x3dbl_3", 96, 96, 3, 3),
        (f"{p}.branch_pool", cin, pool, 1, 1),
    ]


def _block_c(p, c7):
    return [
        (f"{p}.branch1x1", 768, 192, 1, 1),
        (f"{p}.branch7x7_1", 768, c7, 1, 1),
        (f"{p}.branch7x7_2", c7, c7, 1, 7),
        (f"{p}.branch7x7_3", c7, 192, 7, 1),
        (f"{p}.branch7x7dbl_1", 768, c7, 1, 1),
        (f"{p}.branch7x7dbl_2", c7, c7, 7, 1),
        (f"{p}.branch7x7dbl_3", c7, c7, 1, 7),
        (f"{p}.branch7x7dbl_4", c7, c7, 7, 1),
        (f"{p}.branch7x7dbl_5", c7, 192, 1, 7),
        (f"{p}.branch_pool", 768, 192, 1, 1),
    ]


def _block_e(p, cin):
    return [
        (f"{p}.branch1x1", cin, 320, 1, 1),
        (f"{p}.branch3x3_1", cin, 384, 1, 1),
        (f"{p}.branch3x3_2a", 384, 384, 1, 3),
        (f"{p}.branch3x3_2b", 384, 384, 3, 1),
        (f"{p}.branch3x3dbl_1", cin, 448, 1, 1),
        (f"{p}.branch3x3dbl_2", 448, 384, 3, 3),
        (f"{p}.branch3x3dbl_3a", 384, 384, 1, 3),
        (f"{p}.branch3x3dbl_3b", 384, 384, 3, 1),
        (f"{p}.branch_pool", cin, 192, 1, 1),
    ]


def reference_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the reference file (BasicConv2d = conv without bias + BatchNorm)."""
    convs = [
        ("Conv2d_1a_3x3", 3, 32, 3, 3),
        ("Conv2d_2a_3x3", 32, 32, 3, 3),
        ("Conv2d_2b_3x3", 32, 64, 3, 3),
        ("Conv2d_3b_1x1", 64, 80, 1, 1),
        ("Conv2d_4a_3x3", 80, 192, 3, 3),
    ]
    convs += _block_a("Mixed_5b", 192, 32) + _block_a("Mixed_5c", 256, 64) + _block_a("Mixed_5d", 288, 64)
    convs += [
        ("Mixed_6a.branch3x3", 288, 384, 3, 3),
        ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
        ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3),
        ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    ]
    convs += _block_c("Mixed_6b", 128) + _block_c("Mixed_6c", 160) + _block_c("Mixed_6d", 160)
    convs += _block_c("Mixed_6e", 192)
    convs += [
        ("Mixed_7a.branch3x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
        ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
        ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
        ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    ]
    convs += _block_e("Mixed_7b", 1280) + _block_e("Mixed_7c", 2048)
    layout: dict[str, tuple[int, ...]] = {}
    for name, cin, cout, kh, kw in convs:
        layout[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for b in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.bn.{b}"] = (cout,)
    layout["fc.weight"] = (1008, 2048)
    layout["fc.bias"] = (1008,)
    return layout


def random_state_dict(seed: int = 0, with_counters: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in reference_layout().items():
        if key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=g) / fan_in**0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
        if with_counters and key.endswith("running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    return state


def save_hub_style(state: dict, folder: Path, stem: str = "fake_inception") -> Path:
    """Save with the sha256 prefix in the name, as the reference file is named."""
    tmp = folder / f"{stem}.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"{stem}-{digest[:8]}.pth"
    tmp.rename(path)
    return path


def test_layout_matches_the_reference_file_exactly():
    ours = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    assert ours == reference_layout()
    assert len(ours) == 472
    assert sum(torch.Size(s).numel() for s in ours.values()) == 23_885_392


@pytest.mark.parametrize("with_counters", [False, True])
def test_random_weights_load_strictly_and_give_2048_d_features(tmp_path, monkeypatch, with_counters):
    state = random_state_dict(with_counters=with_counters)
    path = save_hub_style(state, tmp_path)
    monkeypatch.setenv("SCALEGEN_INCEPTION_WEIGHTS", str(path))
    net, sha = load_inception()
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = net.state_dict()
    for key, value in state.items():  # every key consumed, with its value
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    feats, logits = net(images)
    assert feats.shape == (3, FEATURE_DIM) and logits.shape == (3, NUM_CLASSES)
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # post-ReLU average pool


def test_a_missing_or_an_extra_key_is_refused(tmp_path):
    state = random_state_dict()
    extra = dict(state, **{"AuxLogits.fc.weight": torch.zeros(1008, 768)})
    with pytest.raises(UserError, match="1 unexpected"):
        load_inception(str(save_hub_style(extra, tmp_path, "extra")))
    missing = dict(state)
    missing.pop("Mixed_7c.branch_pool.conv.weight")
    with pytest.raises(UserError, match="1 missing"):
        load_inception(str(save_hub_style(missing, tmp_path, "missing")))


def test_missing_weights_say_where_to_get_them(monkeypatch):
    monkeypatch.delenv("SCALEGEN_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(UserError) as err:
        resolve_weights(None)
    msg = str(err.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "https://" in msg
    assert "SCALEGEN_INCEPTION_WEIGHTS" in msg and "eval.inception_weights" in msg
    with pytest.raises(UserError, match="does not exist"):
        resolve_weights("/nonexistent/pt_inception.pth")


def test_url_is_downloaded_once_into_the_cache_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALEGEN_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    path = save_hub_style({"w": torch.arange(10)}, src, "blob")
    got = fetch(path.as_uri(), "inception")
    assert got == tmp_path / "cache" / "inception" / path.name and got.read_bytes() == path.read_bytes()
    path.unlink()  # the second call must not need the source
    assert fetch(path.as_uri(), "inception") == got
    bad = src / "other-deadbeef.pth"
    torch.save({"w": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="sha256"):
        fetch(bad.as_uri(), "inception")
    assert not (tmp_path / "cache" / "inception" / bad.name).exists()
    assert not [p for p in (tmp_path / "cache" / "inception").iterdir() if p.name.startswith(".")]


def test_parity_with_pytorch_fid():
    """Runs only where the real weights and the reference implementation are both installed."""
    path = os.environ.get("SCALEGEN_INCEPTION_WEIGHTS")
    if not path or not Path(path).is_file():
        pytest.skip(
            "the real pt_inception-2015-12-05-6726825d.pth is not here (set SCALEGEN_INCEPTION_WEIGHTS)"
        )
    reference = pytest.importorskip(
        "pytorch_fid.inception", reason="pytorch-fid (and torchvision) not installed"
    )
    net, sha = load_inception(path)
    assert sha.startswith("6726825d")
    ref = reference.InceptionV3([3]).eval()
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        want = ref(images.float() / 255)[0].flatten(1)
        got, _ = net(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
