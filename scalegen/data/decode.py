"""Decoding tar members into tensors: PNG/JPEG -> uint8 [C, H, W], WAV -> float32 [1, T] in [-1, 1]."""

from __future__ import annotations

import io
import json
import struct
import wave
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

try:  # zlib-ng reads the same streams: inflates ~1.8x and checksums ~5x faster than the standard zlib
    from zlib_ng import zlib_ng as inflater
except ImportError:  # a platform without its wheel
    inflater = zlib

IMAGE_EXTS = ("png", "jpg", "jpeg")
AUDIO_EXTS = ("wav",)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_image(data: bytes, channels: int | None) -> Tensor:
    """uint8 [C, H, W]; converted to `channels` (1 = greyscale, 3 = RGB) when given."""
    arr = _decode_plain_png(data)
    if arr is None or (channels is not None and arr.shape[2] != channels):
        arr = _decode_pil(data, channels)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def decode_png_batch(datas: Sequence[bytes], channels: int | None) -> np.ndarray | None:
    """uint8 [B, H, W, C] for plain PNGs (see `_decode_plain_png`) that all share one shape and have
    `channels` channels; None when any does not (the caller then decodes one by one).

    Built for the common case of built-in datasets, where per-image Python is most of the cost: same-shape
    PNGs from one writer start with the same 33 bytes (signature and IHDR chunk, CRC included), and
    `encode_png` then writes one IDAT chunk and IEND. That layout, and whether the pixels are one stored
    (uncompressed) zlib block, are checked with array operations over the whole batch: as one array when
    every image is stored at the same length (`_stored_pixels`), else image by image (`_any_pixels`: a
    slice and a checksum, an inflate, or a chunk walk for other layouts)."""
    if not datas:
        return None
    head = datas[0][:33]
    if len(head) < 33 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    ch = 1 if color == 0 else 3
    if depth != 8 or interlace or color not in (0, 2) or (channels is not None and ch != channels):
        return None
    size = h * (1 + w * ch)  # bytes of pixel data: a filter byte and the pixels of each row
    n = len(datas)
    # All stored (what `encode_png` writes for small or noisy images): every PNG has the stored length.
    all_stored = size <= 0xFFFF and list(map(len, datas)).count(size + _STORED_EXTRA) == n
    pixels = _stored_pixels(datas, head, size) if all_stored else None
    if pixels is None:
        pixels = _any_pixels(datas, head, size)
        if pixels is None:
            return None
    rows = pixels.reshape(n, h, 1 + w * ch)
    if rows[:, :, 0].any():
        return None
    return rows[:, :, 1:].reshape(n, h, w, ch)


def _stored_pixels(datas: Sequence[bytes], head: bytes, size: int) -> np.ndarray | None:
    """[B, size] pixel rows (filter bytes included) when every PNG is the first one's signature and IHDR,
    one IDAT chunk holding one stored zlib block of `size` bytes, and IEND, its checksum right; else None.
    The images then lie at the same offsets of their joined bytes: the rows are a view, checked with a
    handful of array operations for the whole batch and a checksum per image."""
    n, length = len(datas), size + _STORED_EXTRA
    joined = b"".join(datas)
    images = np.frombuffer(joined, np.uint8).reshape(n, length)
    front = np.frombuffer(head + (length - _MIN_PNG).to_bytes(4, "big") + b"IDAT", np.uint8)
    layout = (images[:, :41] == front).all() and (images[:, 41:48] == _stored_header(size)).all()
    if not (layout and (images[:, -12:] == _IEND).all()):
        return None
    view = memoryview(joined)
    pixel_spans = map(slice, range(48, n * length, length), range(48 + size, n * length, length))
    sums = np.fromiter(map(inflater.adler32, map(view.__getitem__, pixel_spans)), np.uint32, n)
    if (sums != images[:, -20:-16].copy().view(">u4").ravel()).any():
        return None  # a damaged image: the caller decodes one by one, and skips it
    return images[:, 48 : 48 + size]


def _any_pixels(datas: Sequence[bytes], head: bytes, size: int) -> np.ndarray | None:
    """[B, size] pixel rows of same-shape PNGs, some deflated or laid out otherwise; None when one cannot
    be read this way. The layout (one IDAT chunk filling the space up to IEND) and stored blocks are still
    found with array operations; per image there is then a slice and a checksum, an inflate, or a chunk walk."""
    n = len(datas)
    lengths = np.fromiter(map(len, datas), np.int64, n)
    if lengths.min() < _MIN_PNG:
        return None
    joined = b"".join(datas)
    buf = np.frombuffer(joined, np.uint8)
    ends = lengths.cumsum()
    starts = ends - lengths
    front = buf[starts[:, None] + _FRONT]  # signature, IHDR, IDAT length and type, 7 bytes of zlib stream
    back = buf[ends[:, None] + _BACK]  # the adler-32 of the pixels, IDAT CRC, IEND chunk
    # What each image must start with if it has one IDAT chunk (filling the space up to IEND): the first
    # image's signature and IHDR, its own IDAT length, "IDAT". An image with another IHDR fails either way.
    expected = np.empty((n, 41), np.uint8)
    expected[:, :33] = np.frombuffer(head, np.uint8)
    expected[:, 33:37] = (lengths - _MIN_PNG).astype(">u4").view(np.uint8).reshape(n, 4)
    expected[:, 37:] = _IDAT
    one_idat = (front[:, :41] == expected).all(1) & (back[:, 8:] == _IEND).all(1)
    if (front[~one_idat, :33] != expected[0, :33]).any():
        return None  # another shape or colour type in the batch
    # One final stored block of exactly `size` bytes behind zlib's default header (what zlib writes at level 0).
    stored = one_idat & (lengths == size + _STORED_EXTRA)
    stored &= (front[:, 41:] == _stored_header(size)).all(1) if size <= 0xFFFF else False
    view = memoryview(joined)
    spans = zip(datas, (starts + 41).tolist(), (ends - 16).tolist(), stored.tolist(), one_idat.tolist())
    try:  # per image: the stored pixels (no copy: the join below is the only one), or inflated ones
        chunks = [
            view[a + 7 : b - 4] if is_stored else inflater.decompress(view[a:b] if simple else _idat_chunks(data))
            for data, a, b, is_stored, simple in spans
        ]
    except (inflater.error, ValueError):
        return None
    if set(map(len, chunks)) != {size}:
        return None
    # Stored blocks carry zlib's checksum too (inflating checks it): damaged pixels are caught either way.
    if stored.any():
        sums = [inflater.adler32(c) for c, s in zip(chunks, stored.tolist()) if s]
        if (np.array(sums, np.uint32) != back[stored, :4].copy().view(">u4").ravel()).any():
            return None
    return np.frombuffer(b"".join(chunks), np.uint8)


def _stored_header(size: int) -> np.ndarray:
    """zlib's default header (78 01), a final stored block (01), its length and the length's complement."""
    return np.frombuffer(b"\x78\x01\x01" + size.to_bytes(2, "little") + (size ^ 0xFFFF).to_bytes(2, "little"), np.uint8)


_FRONT = np.arange(48)
_BACK = np.arange(-20, 0)
_IDAT = np.frombuffer(b"IDAT", np.uint8)
_IEND = np.frombuffer(b"\x00\x00\x00\x00IEND\xaeB`\x82", np.uint8)
_MIN_PNG = 57  # signature 8, IHDR chunk 25, IDAT chunk 12 + data, IEND chunk 12
_STORED_EXTRA = _MIN_PNG + 11  # a PNG of one stored zlib block: pixels, zlib header 2, block header 5, adler-32 4


def _idat_chunks(data: bytes) -> bytes:
    """The joined IDAT data after the IHDR chunk, when the only other chunks are tEXt; ValueError otherwise."""
    pos, idat = 33, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            idat.append(data[pos + 8 : pos + 8 + length])
        elif kind == b"IEND":
            return b"".join(idat)
        elif kind != b"tEXt":
            raise ValueError(f"a {kind!r} chunk")
        pos += 12 + length
    raise ValueError("no IEND chunk")


def _decode_pil(data: bytes, channels: int | None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # raises on truncated or corrupt data instead of returning garbage later
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels or 0)
        if mode is None:
            grey = img.mode in ("1", "L", "I", "I;16", "P") and "transparency" not in img.info
            mode = "L" if grey else "RGB"
        arr = np.array(img.convert(mode) if img.mode != mode else img, dtype=np.uint8)  # a writable copy
    return arr[:, :, None] if arr.ndim == 2 else arr


def _decode_plain_png(data: bytes) -> np.ndarray | None:
    """[H, W, C] for an 8-bit grey/RGB, non-interlaced PNG whose rows are all unfiltered (what
    `encode_png` writes): zlib + reshape, ~10x faster than PIL on small images. None for anything else
    (PIL then decodes it, and raises for corrupt data). zlib's checksum catches damaged pixel data."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos, idat, header = 8, [], None
    try:
        while pos + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos : pos + 8])
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", data[pos + 8 : pos + 21])
            elif kind == b"IDAT":
                idat.append(data[pos + 8 : pos + 8 + length])
            elif kind == b"IEND":
                break
            elif kind in (b"PLTE", b"tRNS", b"gAMA", b"iCCP", b"sBIT"):
                return None  # colour semantics PIL knows how to apply
            pos += 12 + length
        if header is None:
            return None
        w, h, depth, color, _, _, interlace = header
        if depth != 8 or interlace or color not in (0, 2):
            return None
        ch = 1 if color == 0 else 3
        rows = np.frombuffer(inflater.decompress(b"".join(idat)), np.uint8)
        if rows.size != h * (1 + w * ch):
            return None
        rows = rows.reshape(h, 1 + w * ch)
    except (struct.error, inflater.error):
        return None
    if rows[:, 0].any():
        return None  # filtered rows (most PNG writers): undo the filters with PIL
    return rows[:, 1:].reshape(h, w, ch).copy()


def decode_wav(data: bytes, sample_rate: int | None) -> Tensor:
    """float32 [1, T] in [-1, 1] from 8/16/32-bit PCM; mono only; the rate must equal `sample_rate`."""
    with wave.open(io.BytesIO(data)) as w:
        rate, channels, width, frames = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
        raw = w.readframes(frames)
    if sample_rate is not None and rate != sample_rate:
        raise ValueError(f"sample rate {rate} Hz, expected {sample_rate} Hz")
    if channels != 1:
        raise ValueError(f"{channels} channels, expected mono")
    if len(raw) != frames * width:
        raise ValueError(f"truncated WAV: {len(raw)} of {frames * width} bytes")
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648
    else:
        raise ValueError(f"unsupported sample width {width} bytes")
    return torch.from_numpy(x.copy())[None]


def encode_wav(x: np.ndarray, sample_rate: int) -> bytes:
    """16-bit mono PCM WAV bytes from int16 samples (or float in [-1, 1])."""
    if x.dtype != np.int16:
        x = np.clip(np.round(np.asarray(x, np.float64) * 32768), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(x.astype("<i2").tobytes())
    return buf.getvalue()


def encode_png(arr: np.ndarray, level: int = 6, min_saving: float = 0.25, min_saved_bytes: int = 1024) -> bytes:
    """A valid PNG of a uint8 [H, W] (grey) or [H, W, 3] (RGB) array, rows unfiltered so that
    `decode_image` can read it back with zlib alone; deterministic.

    The pixels are deflated at `level` only when that saves at least `min_saving` of their bytes and at
    least `min_saved_bytes`; otherwise they are stored (deflate's uncompressed blocks, still a standard
    PNG), which `decode_png_batch` reads in place for ~0.1-0.4 us an image (the checksum). Inflating costs
    ~1.5 us for a 28x28 MNIST digit and ~17 us for a 32x32 RGB image (zlib-ng; zlib is slower), on every
    read of every epoch. Unfiltered rows of small natural or noisy images (CIFAR-10) barely compress; and a
    small image saves little disk even when it does, since a shard pads each member to 512-byte blocks (MNIST:
    2,560 bytes a sample stored, 2,048 deflated: -20% of disk for ~1.5 us of inflating an image, a fifth of
    the ~7.8 us a sample took through the loader's stages).
    Larger smooth images (saving over 1 KiB each) are deflated.
    """
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    h, w = arr.shape[:2]
    ch = 1 if arr.ndim == 2 else arr.shape[2]
    if ch not in (1, 3):
        raise ValueError(f"encode_png takes grey or RGB images, got {ch} channels")
    raw = np.concatenate([np.zeros((h, 1), np.uint8), arr.reshape(h, w * ch)], axis=1).tobytes()
    pixels = zlib.compress(raw, level)
    if len(pixels) > min((1 - min_saving) * len(raw), len(raw) - min_saved_bytes):
        pixels = zlib.compress(raw, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if ch == 1 else 2, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def decode_sample(sample: dict, kind: str, channels: int | None, sample_rate: int | None) -> dict:
    """One raw tar sample -> {"x": tensor, "y": int, "key": str, **numeric json fields}."""
    exts = IMAGE_EXTS if kind == "image" else AUDIO_EXTS
    ext = next((e for e in exts if e in sample), None)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"no {'/'.join(exts)} member (has {members})")
    x = decode_image(sample[ext], channels) if kind == "image" else decode_wav(sample[ext], sample_rate)
    out = {"x": x, "y": int(sample["cls"]) if "cls" in sample else -1, "key": sample["__key__"]}
    if "json" in sample:
        for k, v in json.loads(sample["json"]).items():
            if k not in out:
                out[k] = v
    return out
