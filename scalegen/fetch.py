"""The one way scalegen fetches files: sha256 checksums, a cache folder, and verified downloads.

Datasets (`data/download.py`), feature-extractor weights (`metrics/weights.py`) and releases
(`hub/load.py`) all download through `download`: into a temporary file beside the target, hashed while
written, verified, and only then renamed into place, so a cache never holds a partial or wrong file.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from scalegen.errors import UserError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir(*parts: str) -> Path:
    """$SCALEGEN_CACHE (default ~/.cache/scalegen), joined with `parts`."""
    root = Path(os.environ.get("SCALEGEN_CACHE") or "~/.cache/scalegen").expanduser()
    return root.joinpath(*parts)


def download(url: str, dest: Path, sha256: str | None = None, progress: bool = False,
             timeout: float = 60.0) -> Path:
    """Download `url` to `dest`, verified against `sha256` (a full digest or a prefix of one).

    Raises UserError naming the URL and what went wrong; `dest` is untouched on any failure."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    h = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "scalegen"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:  # noqa: S310
            total = int(response.headers.get("Content-Length") or 0) or None
            with _progress(progress, dest.name, total) as advance:
                while block := response.read(1 << 20):
                    h.update(block)
                    out.write(block)
                    advance(len(block))
        if sha256 is not None and not h.hexdigest().startswith(sha256.lower()):
            raise UserError(f"checksum mismatch for {url}: sha256 {h.hexdigest()[:16]}..., expected "
                            f"{sha256[:16]}...; the server's copy is corrupt or not the file named")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as err:
        raise UserError(f"cannot download {url}: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


class _progress:
    """A Rich download bar (or nothing), as a context manager yielding `advance(nbytes)`."""

    def __init__(self, show: bool, name: str, total: int | None) -> None:
        self.show, self.name, self.total, self.bar = show, name, total, None

    def __enter__(self):
        if not self.show:
            return lambda n: None
        # rich only when a progress bar is shown (it is slow to import)
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), transient=True)
        self.bar.__enter__()
        task = self.bar.add_task(f"downloading {self.name}", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
