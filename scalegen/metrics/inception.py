"""The FID variant of InceptionV3 (TensorFlow 2015-12-05 graph), written here without torchvision.

Layout and state-dict keys are those of `pt_inception-2015-12-05-6726825d.pth`, the port used by
pytorch-fid: torchvision's Inception3 trunk (no auxiliary head, 1008-way `fc`) whose mixed blocks
follow the TF graph, which differs from torchvision's in three places:
  * the pooling branch of every A, C and E block averages 3x3 windows *without* counting padding;
  * the last E block (Mixed_7c) max-pools instead of average-pooling in its pooling branch.
Preprocessing (the pytorch-fid protocol): uint8 -> [0, 1], grey repeated to 3 channels, bilinear
resize to 299x299 (align_corners=False), scale to [-1, 1]. Outputs: the 2048-d average-pool
features (FID, KID) and the 1008-way logits (Inception Score).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scalegen.errors import UserError
from scalegen.metrics.weights import fetch, sha256_file

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_ENV = "SCALEGEN_INCEPTION_WEIGHTS"
NUM_CLASSES = 1008  # the TF graph's softmax has 1008 outputs (1000 ImageNet classes + unused)
FEATURE_DIM = 2048


class BatchNorm(nn.Module):
    """Inference-only batch norm (eps 1e-3, the TF graph's); same keys as nn.BatchNorm2d minus the counter."""

    def __init__(self, channels: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class ConvBN(nn.Module):
    """Convolution (no bias) -> batch norm -> ReLU; the keys are `conv.*` and `bn.*`."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = BatchNorm(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor) -> Tensor:
    # TF's average pool ignores the zero padding when averaging.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg3(x)),
            ],
            1,
        )


class MixedB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class MixedC(nn.Module):
    """17x17 block with factorized 7x7 convolutions."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg3(x))], 1)


class MixedD(nn.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; `max_pool` selects the TF graph's last-block quirk."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d3 = torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d3, self.branch_pool(pooled)], 1)


PRECISIONS = ("fp32", "bf16")
# Devices on which the reference network runs channels-last by default: on CPU it measured 1.45x the
# images/s of NCHW with the same features (docs/benchmarks.md); on GPUs it has not been measured.
CHANNELS_LAST_DEVICES = ("cpu",)
# On these, forward at most this many images at a time: on CPU small batches run faster than big ones
# (cache-resident activations; docs/benchmarks.md "Layout and precision") and peak memory stays small.
CHUNK_DEVICES = {"cpu": 16}


class FIDInceptionV3(nn.Module):
    """InceptionV3 as in the FID reference: images -> (2048-d pool features, 1008-way logits).

    Speed settings that leave the weights alone (`set_speed`): `channels_last` runs the convolutions
    on NHWC tensors and `chunk` forwards at most that many images at a time (both give the same
    features to float32 round-off); `precision="bf16"` runs the trunk under
    bf16 autocast (different features: see docs/benchmarks.md for the FID difference), the pooled
    features and the logits in float32.
    """

    def __init__(self) -> None:
        super().__init__()
        self.channels_last = False
        self.chunk: int | None = None
        self.precision = "fp32"
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, pool_features=32)
        self.Mixed_5c = MixedA(256, pool_features=64)
        self.Mixed_5d = MixedA(288, pool_features=64)
        self.Mixed_6a = MixedB(288)
        self.Mixed_6b = MixedC(768, c7=128)
        self.Mixed_6c = MixedC(768, c7=160)
        self.Mixed_6d = MixedC(768, c7=160)
        self.Mixed_6e = MixedC(768, c7=192)
        self.Mixed_7a = MixedD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.eval()
        self.requires_grad_(False)

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        """uint8 [N, C, H, W] (or float in [0, 1]) -> float [N, 3, 299, 299] in [-1, 1]."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"Inception features need 1 or 3 channels, got {x.shape[1]}")
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def set_speed(
        self, channels_last: bool = False, precision: str = "fp32", chunk: int | None = None
    ) -> FIDInceptionV3:
        if precision not in PRECISIONS:
            raise UserError(f"Inception precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.channels_last, self.precision, self.chunk = channels_last, precision, chunk
        return self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.chunk and len(images) > self.chunk:
            pools, logits = zip(*(self(part) for part in images.split(self.chunk)))
            return torch.cat(pools), torch.cat(logits)
        x = self.preprocess(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            pool = self.trunk(x).float()
        return pool, self.fc(pool)

    def trunk(self, x: Tensor) -> Tensor:
        """Preprocessed images -> the 2048-d average-pool features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x.mean(dim=(2, 3))


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the reference weights file (BatchNorm batch counters, if present, are ignored)."""
    return {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}


def load_state_dict_strict(net: FIDInceptionV3, state: dict[str, Tensor]) -> None:
    """Load the reference file's state dict; every key consumed, none missing, every shape equal."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    want = net.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state) if tuple(state[k].shape) != tuple(want[k].shape))
    if missing or unexpected or wrong:
        raise UserError(
            "the Inception weights do not match the FID InceptionV3 layout: "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} of the wrong shape (e.g. {wrong[:3]}); use {WEIGHTS_FILE}"
        )
    net.load_state_dict(state, strict=True)


def weights_hint() -> str:
    return (
        f"download {WEIGHTS_FILE} from {WEIGHTS_URL} and set {WEIGHTS_ENV}=/path/to/it or the recipe key "
        "eval.inception_weights (a URL there is downloaded once into the cache and checked by sha256)"
    )


def resolve_weights(spec: str | None = None) -> Path:
    """The weights file: `spec` (path or URL), else $SCALEGEN_INCEPTION_WEIGHTS; UserError if neither."""

    spec = spec or os.environ.get(WEIGHTS_ENV)
    if not spec:
        raise UserError(f"no Inception FID weights given: {weights_hint()}")
    try:
        return fetch(spec, "inception")
    except UserError as err:
        raise UserError(f"{err}; {weights_hint()}") from None


def load_inception(
    spec: str | None = None, device: str | torch.device = "cpu", precision: str = "fp32"
) -> tuple[FIDInceptionV3, str]:
    """The FID Inception network with the reference weights, and the weights file's sha256."""

    path = resolve_weights(spec)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = FIDInceptionV3()
    load_state_dict_strict(net, state)
    kind = torch.device(device).type
    net.set_speed(channels_last=kind in CHANNELS_LAST_DEVICES, precision=precision, chunk=CHUNK_DEVICES.get(kind))
    return net.to(device), sha256_file(path)


def preprocessing_id(extractor: str, weights_sha256: str, precision: str = "fp32") -> str:
    """Checksum of everything that turns images into features (extractor, weights, resize, scaling)."""
    desc = {
        "extractor": extractor,
        "weights_sha256": weights_sha256,
        "resize": "bilinear-299-align_corners=False",
        "grey": "repeat-3",
        "scale": "uint8/255*2-1",
        "version": 1,
    }
    if precision != "fp32":  # bf16 features are not fp32 ones: their reference statistics are separate
        desc["precision"] = precision
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
