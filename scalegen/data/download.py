"""Downloading upstream dataset files once, with a progress bar and checksum verification."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from scalegen.data.manifest import DataError


def cache_dir(name: str) -> Path:
    """Where downloads of dataset `name` are kept: $SCALEGEN_DOWNLOADS/name or ~/.cache/scalegen/downloads/name."""
    base = os.environ.get("SCALEGEN_DOWNLOADS", "~/.cache/scalegen/downloads")
    path = Path(base).expanduser() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch(urls: Sequence[str], dest: Path, sha256: str | None = None, progress: bool = True,
          timeout: float = 60.0) -> Path:
    """`dest`, downloaded from the first of `urls` that works unless already there (and verified).

    The file is written under a temporary name and renamed when complete and verified, so an
    interrupted download is never mistaken for a finished one.
    """
    if dest.is_file() and (sha256 is None or _sha256(dest) == sha256):
        return dest
    errors = []
    for url in urls:
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        try:
            _download(url, tmp, progress, timeout)
        except OSError as err:
            errors.append(f"{url}: {err}")
            tmp.unlink(missing_ok=True)
            continue
        if sha256 is not None and (got := _sha256(tmp)) != sha256:
            tmp.unlink(missing_ok=True)
            errors.append(f"{url}: sha256 {got}, expected {sha256}")
            continue
        os.replace(tmp, dest)
        return dest
    raise DataError(f"could not download {dest.name}: {'; '.join(errors)}. Download it yourself and pass "
                    "its folder with --source (or data.source)")


def _download(url: str, path: Path, progress: bool, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "scalegen"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        if not progress:
            while block := response.read(1 << 20):
                out.write(block)
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task(f"downloading {path.name.split('.part-')[0].lstrip('.')}", total=total)
            while block := response.read(1 << 20):
                out.write(block)
                bar.advance(task, len(block))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
