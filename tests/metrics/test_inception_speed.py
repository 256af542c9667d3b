"""The Inception network's speed settings: channels-last gives the same features, bf16 close ones."""

from __future__ import annotations

import pytest
import torch

from scalegen.errors import UserError
from scalegen.metrics.inception import FIDInceptionV3, preprocessing_id


@pytest.fixture(scope="module")
def net_and_images():
    torch.manual_seed(0)
    net = FIDInceptionV3()
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(images)
    return net, images, ref


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_channels_last_gives_the_same_features(net_and_images):
    net, images, (f, logits) = net_and_images
    net.set_speed(channels_last=True)
    try:
        f2, logits2 = net(images)
    finally:
        net.set_speed()
    assert rel(f2, f) <= 1e-4 and rel(logits2, logits) <= 1e-4  # float32 round-off of reordered sums


@torch.no_grad()
def test_chunked_forward_gives_the_same_features(net_and_images):
    net, images, (f, logits) = net_and_images
    net.set_speed(chunk=2)  # 5 images: chunks of 2, 2 and 1
    try:
        f2, logits2 = net(images)
    finally:
        net.set_speed()
    assert f2.shape == f.shape and logits2.shape == logits.shape
    assert rel(f2, f) <= 1e-4 and rel(logits2, logits) <= 1e-4
    for i in range(len(images)):  # each image's row is its own, in order
        assert rel(f2[i], f[i]) <= 1e-4


@torch.no_grad()
def test_bf16_autocast_features_are_close_and_float32(net_and_images):
    net, images, (f, logits) = net_and_images
    net.set_speed(precision="bf16")
    try:
        f2, logits2 = net(images)
    finally:
        net.set_speed()
    assert f2.dtype == torch.float32 and logits2.dtype == torch.float32
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per value); through ~100 layers the errors
    # partly average out: ~5e-3 relative seen. Not the same features, but close ones.
    assert 1e-5 < rel(f2, f) < 5e-2


def test_precision_is_checked_and_keys_the_reference_statistics():
    with pytest.raises(UserError, match="precision 'fp16'"):
        FIDInceptionV3().set_speed(precision="fp16")
    assert preprocessing_id("fid-inception-v3", "ab") == preprocessing_id("fid-inception-v3", "ab", "fp32")
    assert preprocessing_id("fid-inception-v3", "ab", "bf16") != preprocessing_id("fid-inception-v3", "ab")
