"""Write generated audio as 16-bit PCM WAV files (Python's `wave` module; no extra dependency)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
from torch import Tensor


def write_wav(path: str | Path, audio: Tensor, sample_rate: int) -> Path:
    """One mono clip (float [T] or [1, T] in [-1, 1]) -> 16-bit PCM WAV at `sample_rate` Hz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = audio.detach().float().cpu().reshape(-1).clamp(-1, 1).numpy()
    pcm = np.round(samples * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())
    return path


def write_wavs(out: str | Path, audio: Tensor, sample_rate: int) -> list[Path]:
    """A batch [n, 1, T] -> `{stem}_{i:03d}.wav` next to `out` (its suffix is replaced)."""
    out = Path(out)
    paths = [out.with_name(f"{out.stem}_{i:03d}.wav") for i in range(len(audio))]
    return [write_wav(p, clip, sample_rate) for p, clip in zip(paths, audio)]
