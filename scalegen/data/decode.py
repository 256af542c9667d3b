"""Decoding tar members into tensors: PNG/JPEG -> uint8 [C, H, W], WAV -> float32 [1, T] in [-1, 1]."""

from __future__ import annotations

import io
import json
import wave

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_EXTS = ("png", "jpg", "jpeg")
AUDIO_EXTS = ("wav",)


def decode_image(data: bytes, channels: int | None) -> Tensor:
    """uint8 [C, H, W]; converted to `channels` (1 = greyscale, 3 = RGB) when given."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # raises on truncated or corrupt data instead of returning garbage later
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels or 0)
        if mode is None:
            grey = img.mode in ("1", "L", "I", "I;16", "P") and "transparency" not in img.info
            mode = "L" if grey else "RGB"
        arr = np.array(img.convert(mode) if img.mode != mode else img, dtype=np.uint8)  # a writable copy
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


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


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W] (greyscale) or [H, W, 3] (RGB) array; deterministic."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


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
