"""Transforms against independent computations (PIL, numpy, the mu-law formula)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from scalegen.data import transforms as T


def _img(c: int = 3, h: int = 12, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_flip_is_a_mirror_half_the_time() -> None:
    x, gen = _img(), torch.Generator().manual_seed(0)
    outs = [T.random_flip(x, gen) for _ in range(400)]
    flipped = [torch.equal(o, torch.from_numpy(x.numpy()[..., ::-1].copy())) for o in outs]
    assert all(f or torch.equal(o, x) for f, o in zip(flipped, outs))
    assert abs(sum(flipped) / 400 - 0.5) < 0.1  # 4 sigma


def test_crop_with_padding_is_a_window_of_the_reflect_padded_image() -> None:
    x, gen = _img(), torch.Generator().manual_seed(1)
    padded = np.pad(x.numpy(), ((0, 0), (2, 2), (2, 2)), mode="reflect")
    offsets = set()
    for _ in range(200):
        y = T.random_crop(x, (12, 16), 2, gen).numpy()
        hits = [(i, j) for i in range(5) for j in range(5) if np.array_equal(padded[:, i:i + 12, j:j + 16], y)]
        assert hits, "crop is not a window of the padded image"
        offsets.add(hits[0])
    assert len(offsets) == 25  # every offset occurs


def test_center_crop_indices() -> None:
    x = _img(h=10, w=15)
    assert torch.equal(T.center_crop(x, 6), x[:, 2:8, 4:10])
    with pytest.raises(ValueError, match="resize"):
        T.center_crop(x, 11)


@pytest.mark.parametrize("size", [6, 24])
def test_resize_matches_pil_bilinear(size: int) -> None:
    x = _img(c=1, h=12, w=16, seed=3)
    y = T.resize(x, size)
    h, w = T.resized_shape(12, 16, size)
    assert (h, w) == (size, round(16 * size / 12)) and y.shape == (1, h, w)
    ref = np.asarray(Image.fromarray(x[0].numpy()).resize((w, h), Image.BILINEAR)).astype(int)
    assert np.abs(y[0].numpy().astype(int) - ref).max() <= 2  # same filter; rounding differs by a level or so
    assert torch.equal(T.resize(torch.full((3, 7, 9), 77, dtype=torch.uint8), 14), torch.full((3, 14, 18), 77,
                                                                                              dtype=torch.uint8))


def test_crop_or_pad() -> None:
    x = torch.arange(10.0)[None]
    assert torch.equal(T.crop_or_pad(x, 4), x[:, :4])
    assert torch.equal(T.crop_or_pad(x, 12), torch.cat([x, torch.zeros(1, 2)], 1))
    gen = torch.Generator().manual_seed(0)
    starts = {int(T.crop_or_pad(x, 4, gen)[0, 0]) for _ in range(200)}
    assert starts == set(range(7))


def test_mu_law_against_the_formula_and_round_trip() -> None:
    x = torch.linspace(-1, 1, 2001)
    codes = T.mu_law_encode(x, 256)
    expected = [round((math.copysign(math.log1p(255 * abs(v)) / math.log1p(255), v) + 1) / 2 * 255)
                for v in x.double().tolist()]
    assert codes.min() == 0 and codes.max() == 255
    assert np.abs(codes.numpy() - np.array(expected)).max() <= 1  # float32 vs float64 at .5 boundaries
    assert (codes[1:] >= codes[:-1]).all()
    back = T.mu_law_decode(codes, 256)
    # Decoding lands within half a code step (1/255) of x in the companded domain F(v).
    F = lambda v: torch.sign(v) * torch.log1p(255 * v.abs()) / math.log1p(255)  # noqa: E731
    assert ((F(back) - F(x)).abs() <= 1 / 255 + 1e-5).all()
    assert torch.equal(T.mu_law_encode(T.mu_law_decode(torch.arange(256), 256), 256), torch.arange(256))
