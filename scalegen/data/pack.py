"""`scalegen data pack SRC --out DIR`: the user's own folder of images or audio as shards.

Layouts: `SRC/class_name/*.png|jpg|jpeg|wav` (labels from the sorted class folder names), or files
directly in SRC (unlabelled: y = -1). Files are stored unchanged (no re-encoding); the manifest
records the common shape when all examples share it (else 0 for the varying dims: set data.resize /
data.center_crop or data.clip_samples when loading).
"""

from __future__ import annotations

import hashlib
import re
import wave
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from scalegen.data.manifest import DataError, Manifest
from scalegen.data.prepare import Prepared, write_prepared

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
AUDIO_SUFFIXES = {".wav": "wav"}


def pack_folder(src: str | Path, out: str | Path, shard_size: int = 5000, val_fraction: float = 0.0,
                test_fraction: float = 0.0, seed: int = 0, name: str | None = None,
                progress: bool = True) -> Manifest:
    """Pack `src` into `{split}-{index:06d}.tar` shards + manifest.json in `out`; returns the manifest."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise DataError(f"{src} is not a folder of images or audio")
    files, class_names = _list(src)
    suffixes = {f.suffix.lower() for f, _ in files}
    if suffixes <= IMAGE_SUFFIXES.keys():
        kind, shape, levels, rate = "image", *_image_shape(files), None
    elif suffixes <= AUDIO_SUFFIXES.keys():
        kind, (shape, levels, rate) = "audio", _audio_shape(files)
    else:
        raise DataError(f"{src} mixes images and audio ({sorted(suffixes)}); pack them separately")
    if not 0 <= val_fraction + test_fraction < 1:
        raise DataError("--val-fraction + --test-fraction must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(len(files))
    n_test, n_val = round(len(files) * test_fraction), round(len(files) * val_fraction)
    cut = {"train": order[n_test + n_val:], "val": order[n_test:n_test + n_val], "test": order[:n_test]}
    keys = _keys([f for f, _ in files], src)
    splits = {k: [(keys[i], files[i][0], files[i][1]) for i in sorted(v)] for k, v in cut.items() if len(v)}
    listing = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(src)}\n" for f, _ in files)
    prep = Prepared(
        kind=kind, shape=shape, class_names=class_names, splits=splits, encode=_encode,
        source={"name": f"packed from {src}", "local": str(src), "files": len(files),
                "sha256": hashlib.sha256(listing.encode()).hexdigest(),
                "sha256_of": "`sha256sum` listing of the files, relative paths, sorted"},
        notes=f"packed by `scalegen data pack`; held out by numpy default_rng({seed}): "
              f"test {n_test}, val {n_val}; labels {'from class folders' if class_names else 'none (-1)'}",
        fields={"png|jpg" if kind == "image" else "wav": "the original file, unchanged",
                "cls": "index into class_names (absent when unlabelled)"},
        sample_rate=rate, levels=levels, shard_size=shard_size,
    )
    return write_prepared(name or src.name, prep, out, shard_size, progress)


def _list(src: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    known = IMAGE_SUFFIXES.keys() | AUDIO_SUFFIXES.keys()
    flat = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in known)
    dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if flat and dirs:
        raise DataError(f"{src} has both files and class folders: use class_name/ folders for everything, "
                        "or no folders (unlabelled)")
    if flat:
        return [(p, -1) for p in flat], []
    files = [(p, label) for label, d in enumerate(dirs)
             for p in sorted(d.rglob("*")) if p.is_file() and p.suffix.lower() in known]
    if not files:
        raise DataError(f"no .png/.jpg/.jpeg/.wav files in {src} or its class folders")
    return files, [d.name for d in dirs]


def _keys(files: list[Path], src: Path) -> list[str]:
    """Unique WebDataset keys: relative path without suffix; dots (which end a key in a tar) become _."""
    keys, seen = [], set()
    for f in files:
        key = re.sub(r"[.\s]", "_", str(f.relative_to(src).with_suffix("")))
        base, n = key, 1
        while key in seen:
            key, n = f"{base}_{n}", n + 1
        seen.add(key)
        keys.append(key)
    return keys


def _image_shape(files: list[tuple[Path, int]]) -> tuple[list[int], int]:
    sizes, grey = set(), True
    for f, _ in files:
        try:
            with Image.open(f) as img:
                sizes.add(img.size)
                grey &= img.mode in ("1", "L", "I", "I;16")
        except OSError as err:
            raise DataError(f"cannot read image {f}: {err}") from None
    (w, h), = sizes if len(sizes) == 1 else {(0, 0)}
    return [1 if grey else 3, h, w], 256


def _audio_shape(files: list[tuple[Path, int]]) -> tuple[list[int], int, int]:
    rates, lengths, widths = {}, set(), set()
    for f, _ in files:
        try:
            with wave.open(str(f)) as w:
                if w.getnchannels() != 1:
                    raise DataError(f"{f} has {w.getnchannels()} channels; scalegen audio is mono")
                rates.setdefault(w.getframerate(), f)
                lengths.add(w.getnframes())
                widths.add(w.getsampwidth())
        except (wave.Error, EOFError) as err:
            raise DataError(f"cannot read WAV {f}: {err}") from None
    if len(rates) > 1:
        (r1, f1), (r2, f2) = list(rates.items())[:2]
        raise DataError(f"sample rates differ: {f1} is {r1} Hz, {f2} is {r2} Hz; resample to one rate first")
    (length,) = lengths if len(lengths) == 1 else {0}
    return [1, length], 2 ** (8 * max(widths)), next(iter(rates))


def _encode(split: str, i: int, item: tuple[str, Path, int]) -> dict[str, Any]:
    key, path, label = item
    sample: dict[str, Any] = {"__key__": key, IMAGE_SUFFIXES.get(path.suffix.lower(), "wav"): path.read_bytes()}
    if label >= 0:
        sample["cls"] = str(label).encode()
    return sample
