"""PNG encoding and the fast batch decoder against PIL, an independent PNG implementation."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from scalegen.data import decode
from scalegen.data.decode import decode_image, decode_png_batch, encode_png
from scalegen.data.pipeline import ShardStream, StreamOptions


def _pil(data: bytes) -> np.ndarray:
    arr = np.array(Image.open(io.BytesIO(data)))
    return arr[:, :, None] if arr.ndim == 2 else arr


def _idat(data: bytes) -> bytes:
    n = struct.unpack(">I", data[33:37])[0]
    assert data[37:41] == b"IDAT"
    return data[41 : 41 + n]


def test_pixels_are_deflated_only_when_that_saves_a_quarter_and_a_kib() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # incompressible
    digit = np.repeat(np.arange(28, dtype=np.uint8)[None, :] * 9, 28, axis=0)  # MNIST-sized: saves < 1 KiB
    smooth = np.repeat(np.arange(64, dtype=np.uint8)[None, :] * 4, 64, axis=0)
    cases = [(noise, {}, True), (digit, {}, True), (digit, {"min_saved_bytes": 0}, False), (smooth, {}, False)]
    for arr, options, stored in cases:
        png = encode_png(arr, **options)
        assert np.array_equal(_pil(png), arr.reshape(*arr.shape[:2], -1))  # a standard PNG
        raw_bytes = arr.shape[0] * (1 + arr[0].size)
        # A stored zlib stream is the 2-byte header, 5 bytes per block of <= 65535 bytes, the data and Adler-32.
        assert (len(_idat(png)) == raw_bytes + 2 + 5 + 4) is stored
        if not stored:
            assert len(_idat(png)) < 0.75 * raw_bytes
        assert zlib.decompress(_idat(png))[:: 1 + arr[0].size] == bytes(arr.shape[0])  # unfiltered rows


@pytest.fixture(params=["zlib-ng", "zlib"])
def inflater(request, monkeypatch):
    """Decode with zlib-ng (the default) and with the standard zlib (the fallback without its wheel)."""
    if request.param == "zlib":
        monkeypatch.setattr(decode, "inflater", zlib)
    else:
        assert decode.inflater.__name__.startswith("zlib_ng")
    return request.param


@pytest.mark.parametrize("channels", [1, 3])
def test_batch_decode_equals_pil_image_by_image(channels: int, inflater: str) -> None:
    rng = np.random.default_rng(channels)
    shape = (12, 10) if channels == 1 else (12, 10, 3)
    arrs = [rng.integers(0, 256 if i % 2 else 4, shape, dtype=np.uint8) for i in range(9)]  # stored and deflated
    pngs = [encode_png(a, min_saved_bytes=0) for a in arrs]
    assert len({len(p) for p in pngs}) > 1  # some deflated
    # Another writer's chunk layout (a tEXt chunk, the pixels split over two IDAT chunks) takes the general walk.
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    idat = _idat(pngs[0])
    pngs[0] = pngs[0][:33] + chunk(b"tEXt", b"Comment\0hi") + chunk(b"IDAT", idat[:5]) + chunk(b"IDAT", idat[5:]) \
        + chunk(b"IEND", b"")
    batch = decode_png_batch(pngs, channels)
    assert batch is not None and batch.shape == (9, 12, 10, channels)
    for png, got in zip(pngs, batch):
        assert np.array_equal(got, _pil(png))
        assert np.array_equal(decode_image(png, channels).permute(1, 2, 0).numpy(), got)
    # A batch of stored images only: the pixels are read in place from the joined bytes.
    noise = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(5)]
    stored = [encode_png(a) for a in noise]
    assert all(len(_idat(p)) == 12 * (1 + noise[0][0].size) + 11 for p in stored)
    batch = decode_png_batch(stored, channels)
    assert batch is not None and all(np.array_equal(got, _pil(p)) for got, p in zip(batch, stored))


def test_a_batch_stored_at_one_length_is_read_as_one_array(monkeypatch) -> None:
    """Stored images of one length never reach the image-by-image path; anything else does."""
    rng = np.random.default_rng(2)
    stored = [encode_png(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)) for _ in range(4)]
    general = decode._any_pixels
    calls = []
    monkeypatch.setattr(decode, "_any_pixels", lambda *a: calls.append(1) or general(*a))
    batch = decode_png_batch(stored, 3)
    assert batch is not None and not calls
    assert all(np.array_equal(got, _pil(p)) for got, p in zip(batch, stored))
    deflated = encode_png(np.zeros((6, 7, 3), np.uint8), min_saved_bytes=0)
    assert decode_png_batch([*stored, deflated], 3) is not None and calls == [1]


def test_batch_decode_declines_what_it_cannot_do_fast(inflater: str) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    plain = encode_png(a)
    filtered = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(filtered, format="PNG")  # PIL filters rows
    other_size = encode_png(rng.integers(0, 256, (8, 9), dtype=np.uint8))
    corrupt = plain[:60] + bytes([plain[60] ^ 0xFF]) + plain[61:]  # a pixel of the stored data
    assert decode_png_batch([plain, plain], 1) is not None
    assert decode_png_batch([plain, plain], 3) is None  # another channel count
    assert decode_png_batch([plain, other_size], 1) is None
    assert decode_png_batch([filtered.getvalue()], 3) is None or np.array_equal(
        decode_png_batch([filtered.getvalue()], 3)[0], _pil(filtered.getvalue())
    )
    assert decode_png_batch([plain, corrupt], 1) is None  # zlib's checksum: the caller decodes one by one
    deflated = encode_png(a // 64, min_saved_bytes=0)  # 4 levels: deflated
    assert len(deflated) < len(plain)
    assert decode_png_batch([deflated, plain], 1) is not None
    assert decode_png_batch([deflated, corrupt], 1) is None  # the checksum of a stored block beside inflated ones
    wrong_length = plain[:44] + bytes([plain[44] ^ 1]) + plain[45:]  # LEN no longer matches NLEN: not stored
    assert decode_png_batch([plain, wrong_length], 1) is None
    assert decode_png_batch([plain, plain[:40]], 1) is None  # truncated inside the IDAT chunk's header
    assert decode_png_batch([], 1) is None
    # Stored PNGs of one length that still differ: another shape with as many pixel bytes (2x5 and 3x3 grey:
    # 12 bytes with the filter bytes), a damaged IEND chunk.
    two_by_five, three_by_three = encode_png(a[:2, :5]), encode_png(a[:3, :3])
    assert len(two_by_five) == len(three_by_three)
    assert decode_png_batch([two_by_five, three_by_three], 1) is None
    assert decode_png_batch([plain, plain[:-5] + b"X" + plain[-4:]], 1) is None
    assert decode_png_batch([plain, plain], 1).shape == (2, 8, 8, 1)


@pytest.mark.parametrize("labelled", ["all", "some"])
@pytest.mark.parametrize("augment", [False, True])
def test_stream_decodes_a_batch_as_it_decodes_each_sample(labelled: str, augment: bool) -> None:
    """The batch path of `ShardStream` (key, PNG and label read in one pass; labels parsed together, -1
    where a sample has none; channels moved first through int16; random transforms drawn image by image)
    gives what decoding sample by sample gives."""
    rng = np.random.default_rng(1)
    raws = []
    for i in range(6):
        pixels = rng.integers(0, 256 if i % 2 else 4, (5, 7, 3), dtype=np.uint8)
        raw = {"__key__": f"k{i}", "png": encode_png(pixels, min_saved_bytes=0)}  # stored and deflated
        if labelled == "all" or i % 3:
            raw["cls"] = str(i).encode()
        raws.append(raw)
    opts = StreamOptions(kind="image", channels=3, sample_rate=None, batch_size=6, train=augment)
    if augment:
        opts.random_flip, opts.random_crop_padding = True, 2
    stream = ShardStream([], [], opts)
    batch = stream._decode_batch(raws, torch.Generator().manual_seed(3))
    assert batch is not None
    gen = torch.Generator().manual_seed(3)
    each = [stream._decode_one(raw, gen) for raw in raws]
    assert batch["key"] == [s["key"] for s in each] == [f"k{i}" for i in range(6)]
    assert batch["y"].tolist() == [s["y"] for s in each]
    assert batch["x"].dtype == torch.uint8 and batch["x"].is_contiguous() and batch["x"].shape == (6, 3, 5, 7)
    assert torch.equal(batch["x"], torch.stack([s["x"] for s in each]))
    if augment:  # the draws did change the images
        assert not torch.equal(batch["x"], torch.stack([decode_image(raw["png"], 3) for raw in raws]))
    assert (batch["y"] == -1).sum() == (0 if labelled == "all" else 2)
    assert stream._decode_batch([*raws[:5], {**raws[5], "json": b"{}"}], torch.Generator()) is None  # declines
