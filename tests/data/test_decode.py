"""Decoding: `.npy` images (the header parsed once per layout) against numpy.load, PNG/JPEG through PIL, and
the per-sample crc32 that makes damage to raw pixels detectable."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from scalegen.data.decode import decode_image, decode_npy, decode_sample, encode_npy
from scalegen.data.shards import sample_crc


@pytest.mark.parametrize("shape,dtype", [((1, 28, 28), np.uint8), ((3, 32, 32), np.uint8), ((5,), np.float32),
                                         ((2, 3), np.int64)])
def test_npy_equals_numpy_load_first_and_later_calls(shape, dtype) -> None:
    rng = np.random.default_rng(0)
    for _ in range(3):  # the first call parses the header, later ones reuse it
        arr = (rng.random(shape) * 255).astype(dtype)
        data = encode_npy(arr)
        ref = np.load(io.BytesIO(data))
        got = decode_npy(data)
        assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref)


def test_damaged_npy_is_refused() -> None:
    data = encode_npy(np.zeros((1, 4, 4), np.uint8))
    decode_npy(data)
    with pytest.raises(ValueError, match="truncated"):
        decode_npy(data[:-3])
    with pytest.raises(ValueError, match="not a .npy"):
        decode_npy(b"\x00" + data[1:])
    with pytest.raises(ValueError, match="expected uint8"):
        decode_image(encode_npy(np.zeros((4, 4), np.uint8)), 1, "npy")  # not [C, H, W]


@pytest.mark.parametrize("fmt,mode", [("PNG", "L"), ("PNG", "RGB"), ("JPEG", "RGB")])
def test_png_and_jpeg_decode_as_pil_does(fmt: str, mode: str) -> None:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (6, 7) if mode == "L" else (6, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format=fmt)
    ref = np.array(Image.open(io.BytesIO(buf.getvalue())))
    ref = ref[:, :, None] if ref.ndim == 2 else ref
    got = decode_image(buf.getvalue(), None, fmt.lower())
    assert got.shape == (ref.shape[2], 6, 7) and np.array_equal(got.permute(1, 2, 0).numpy(), ref)
    assert decode_image(buf.getvalue(), 3, "png").shape == (3, 6, 7)  # converted to the manifest's channels


def test_crc32_member_detects_damage_to_any_member() -> None:
    sample = {"__key__": "k", "npy": encode_npy(np.arange(16, dtype=np.uint8).reshape(1, 4, 4)), "cls": b"3"}
    sample["crc32"] = sample_crc(sample).encode()
    assert decode_sample(sample, "image", 1, None, checked=True)["y"] == 3
    for ext in ("npy", "cls"):
        damaged = dict(sample)
        damaged[ext] = damaged[ext][:-1] + bytes([damaged[ext][-1] ^ 1])  # one bit
        with pytest.raises(ValueError, match="checksum mismatch"):
            decode_sample(damaged, "image", 1, None)
    unchecked = {k: v for k, v in sample.items() if k != "crc32"}
    assert decode_sample(unchecked, "image", 1, None)["key"] == "k"  # data without checksums still loads
    with pytest.raises(ValueError, match="no crc32"):
        decode_sample(unchecked, "image", 1, None, checked=True)  # but not where every sample has one
