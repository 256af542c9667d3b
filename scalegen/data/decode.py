"""Decoding samples into tensors: `.npy` -> uint8 [C, H, W] as stored, PNG/JPEG -> uint8 [C, H, W] (PIL),
WAV -> float32 [1, T] in [-1, 1]; a sample's `crc32` member is checked first."""

from __future__ import annotations

import io
import json
import wave

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from scalegen.data.shards import sample_crc

IMAGE_EXTS = ("npy", "png", "jpg", "jpeg")
AUDIO_EXTS = ("wav",)


def encode_npy(arr: np.ndarray) -> bytes:
    """A standard `.npy` file of the array (what `numpy.load` reads)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int, int]] = {}  # header -> dtype, shape, offset, count


def decode_npy(data: bytes) -> np.ndarray:
    """The array of a `.npy` file. `numpy.load` parses the header text on every call (~20x the cost of the
    copy for a small image); same-shape arrays share one header, so it is parsed once and remembered."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file")
    end = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    header = bytes(data[:end])
    known = _NPY_HEADERS.get(header)
    if known is None:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype.hasobject or not arr.flags.c_contiguous:
            return arr
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[header] = (arr.dtype, arr.shape, end, arr.size)
        return arr
    dtype, shape, offset, count = known
    if len(data) != offset + count * dtype.itemsize:
        raise ValueError(f"truncated .npy: {len(data)} bytes for {shape} {dtype}")
    return np.frombuffer(data, dtype, count, offset).reshape(shape)


def decode_image(data: bytes, channels: int | None, ext: str = "png", tensor: bool = True) -> Tensor | np.ndarray:
    """uint8 [C, H, W]: a `.npy` as stored ([C, H, W] uint8), anything else through PIL, converted to
    `channels` (1 = greyscale, 3 = RGB) when given. `tensor=False`: a numpy array (for a `.npy`, a read-only
    view of `data`)."""
    if ext == "npy":
        arr = decode_npy(data)
        if arr.dtype != np.uint8 or arr.ndim != 3 or (channels is not None and arr.shape[0] != channels):
            raise ValueError(f".npy image of {arr.dtype} {arr.shape}, expected uint8 [{channels or 'C'}, H, W]")
        return torch.from_numpy(arr.copy()) if tensor else arr  # a writable copy: `data` is immutable
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # raises on truncated or corrupt data instead of returning garbage later
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels or 0)
        if mode is None:
            grey = img.mode in ("1", "L", "I", "I;16", "P") and "transparency" not in img.info
            mode = "L" if grey else "RGB"
        arr = np.array(img.convert(mode) if img.mode != mode else img, dtype=np.uint8)  # a writable copy
    arr = np.ascontiguousarray((arr[:, :, None] if arr.ndim == 2 else arr).transpose(2, 0, 1))
    return torch.from_numpy(arr) if tensor else arr


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


def decode_sample(sample: dict, kind: str, channels: int | None, sample_rate: int | None,
                  checked: bool = False, tensor: bool = True) -> dict:
    """One raw tar sample -> {"x": tensor, "y": int, "key": str, **numeric json fields}; ValueError when its
    checksum fails (or, `checked`: it has none) or it cannot be decoded. `tensor=False`: images as numpy."""
    if "crc32" in sample:
        if sample["crc32"].decode("ascii", "replace") != sample_crc(sample):
            raise ValueError("checksum mismatch (damaged bytes)")
    elif checked:
        raise ValueError("no crc32 member (its header was damaged)")
    exts = IMAGE_EXTS if kind == "image" else AUDIO_EXTS
    for ext in exts:
        if ext in sample:
            break
    else:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"no {'/'.join(exts)} member (has {members})")
    x = decode_image(sample[ext], channels, ext, tensor) if kind == "image" else decode_wav(sample[ext], sample_rate)
    out = {"x": x, "y": int(sample["cls"]) if "cls" in sample else -1, "key": sample["__key__"]}
    if "json" in sample:
        for k, v in json.loads(sample["json"]).items():
            if k not in out:
                out[k] = v
    return out
