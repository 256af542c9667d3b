"""Feature-extractor weights: a local path or a URL downloaded once into a cache, checked by sha256."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

from scalegen.errors import UserError
from scalegen.fetch import cache_dir as cache_root
from scalegen.fetch import download, sha256_file

# torch.hub's convention: a file named `name-<first 8+ hex digits of its sha256>.ext`.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


def cache_dir() -> Path:
    """Where scalegen caches weights and reference statistics: $SCALEGEN_CACHE or ~/.cache/scalegen."""
    return cache_root()


def expected_hash(name: str, sha256: str | None = None) -> str | None:
    """The sha256 (or its prefix) a file must have: given explicitly, or from a hub-style file name."""
    if sha256:
        return sha256.lower()
    m = _HASH_IN_NAME.search(name)
    return m.group(1) if m else None


def verify(path: Path, sha256: str | None) -> None:
    if sha256 is None:
        return
    actual = sha256_file(path)
    if not actual.startswith(sha256):
        raise UserError(
            f"{path} has sha256 {actual[:16]}..., expected {sha256[:16]}...: the file is corrupt "
            "or not the one named; delete it and fetch it again"
        )


def fetch(spec: str, subdir: str, sha256: str | None = None) -> Path:
    """A local file for `spec` (a path, or an http(s)/file URL downloaded once into the cache).

    The download goes to a temporary file, is verified against `sha256` (or the hash in the file
    name) and only then moved into place, so the cache never holds a partial or wrong file.
    """
    if "://" not in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"weights file {path} does not exist")
        verify(path, expected_hash(path.name, sha256))
        return path
    name = Path(urllib.request.url2pathname(spec.split("?")[0].rstrip("/").rsplit("/", 1)[-1])).name
    want = expected_hash(name, sha256)
    target = cache_dir() / subdir / name
    if target.is_file():
        verify(target, want)
        return target
    download(spec, target, want, progress=True)
    return target
