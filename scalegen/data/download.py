"""Downloading upstream dataset files once, with a progress bar and checksum verification."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from scalegen.data.manifest import DataError
from scalegen.errors import UserError
from scalegen.fetch import download, sha256_file


def cache_dir(name: str) -> Path:
    """Where downloads of dataset `name` are kept: $SCALEGEN_DOWNLOADS/name or ~/.cache/scalegen/downloads/name."""
    base = os.environ.get("SCALEGEN_DOWNLOADS", "~/.cache/scalegen/downloads")
    path = Path(base).expanduser() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch(urls: Sequence[str], dest: Path, sha256: str | None = None, progress: bool = True,
          timeout: float = 60.0) -> Path:
    """`dest`, downloaded from the first of `urls` that works unless already there (and verified)."""
    if dest.is_file() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    errors = []
    for url in urls:
        try:
            return download(url, dest, sha256, progress=progress, timeout=timeout)
        except UserError as err:
            errors.append(str(err))
    raise DataError(f"could not download {dest.name}: {'; '.join(errors)}. Download it yourself and pass "
                    "its folder with --source (or data.source)")
