"""WebDataset shards: URLs, reading samples out of a tar stream, and writing shards atomically.

A shard is a plain tar file (`{split}-{index:06d}.tar`) whose members are `{key}.{ext}`; the members
of one sample are adjacent. Extensions used by scalegen: `png`/`jpg` (image), `wav` (audio), `cls`
(integer label as text), `json` (other fields, e.g. the FSDD speaker).
"""

from __future__ import annotations

import io
import os
import shlex
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import webdataset as wds
from webdataset.shardlists import expand_urls as _wds_expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

from scalegen.data.manifest import DataError, ShardInfo, SplitInfo, atomic_write_bytes, sha256_file

Sample = dict[str, Any]  # "__key__" -> str, extension -> bytes


# ---- URLs ------------------------------------------------------------------------------------
def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from a spec: brace patterns (`train-{000000..000009}.tar`), `::`-joined lists, or a list."""
    if isinstance(spec, str):
        return [str(os.path.expanduser(u)) if _scheme(u) == "" else u for u in _wds_expand_urls(spec)]
    return [u for s in spec for u in expand_urls(s)]


def _scheme(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(url).scheme
    return "" if len(scheme) <= 1 else scheme  # a Windows drive letter is not a scheme


def shard_name(url: str) -> str:
    """The shard's file name, which keys it in the manifest (`pipe:` URLs: the last word of the command)."""
    if _scheme(url) == "pipe":
        url = shlex.split(url[len("pipe:"):])[-1]
    return os.path.basename(urlparse(url).path if _scheme(url) else url)


def join_url(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if _scheme(root) else str(Path(root) / name)


def open_url(url: str) -> IO[bytes]:
    """A binary stream for a local path, `file://`, `pipe:CMD` (stdout of CMD) or any fsspec URL (s3://...)."""
    scheme = _scheme(url)
    if scheme == "":
        return open(os.path.expanduser(url), "rb")
    if scheme == "file":
        return open(url2pathname(urlparse(url).path), "rb")
    if scheme == "pipe":
        return wds.gopen(url, "rb")  # a Pipe: closing it raises if the command failed
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec ships with lightning
        raise DataError(f"cannot open {url}: install fsspec and its {scheme} backend") from None
    return fsspec.open(url, "rb").open()


def url_exists(url: str) -> bool:
    """Whether a shard exists; a `pipe:` command counts as present (it cannot be checked unrun)."""
    scheme = _scheme(url)
    if scheme == "":
        return Path(os.path.expanduser(url)).is_file()
    if scheme == "file":
        return Path(url2pathname(urlparse(url).path)).is_file()
    if scheme == "pipe":
        return True
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.exists(path))


# ---- reading -----------------------------------------------------------------------------------
def iter_shard(url: str) -> Iterator[Sample]:
    """The samples of one shard in order. Errors (missing, truncated, corrupt) propagate to the caller."""
    stream = open_url(url)
    try:
        members = ({**m, "__url__": url} for m in tar_file_iterator(stream))
        for sample in group_by_keys(members):
            sample.pop("__url__", None)
            yield sample
    finally:
        stream.close()


# ---- writing -----------------------------------------------------------------------------------
def shard_file_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def tar_bytes(samples: Iterable[Sample]) -> bytes:
    """One shard as bytes; deterministic (fixed mtime, owner and mode) so a re-run reproduces it exactly."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0, user="scalegen", group="scalegen", mode=0o0444) as writer:
        for sample in samples:
            writer.write(sample)
    return buf.getvalue()


def write_split(
    out: Path,
    split: str,
    items: Sequence[Any],
    encode: Callable[[int, Any], Sample],
    shard_size: int,
    previous: dict[str, ShardInfo] | None = None,
    on_shard: Callable[[ShardInfo, bool], None] | None = None,
) -> SplitInfo:
    """Write `items` (encoded one by one with `encode(index, item)`) as shards of `shard_size` samples.

    Each shard is written to a temporary name, synced and renamed, so a crash never leaves a partial
    shard under its final name. A shard whose file already exists with the sha256 recorded in
    `previous` (an earlier run's manifest or progress file) is kept without re-encoding.
    `on_shard(info, skipped)` is called after each shard (progress, partial manifests).
    """
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    info = SplitInfo()
    previous = previous or {}
    for index, start in enumerate(range(0, len(items), shard_size)):
        chunk = items[start : start + shard_size]
        name = shard_file_name(split, index)
        path = out / name
        old = previous.get(name)
        if old is not None and old.count == len(chunk) and path.is_file() and sha256_file(path) == old.sha256:
            shard, skipped = old, True
        else:
            data = tar_bytes(encode(start + i, item) for i, item in enumerate(chunk))
            atomic_write_bytes(path, data)
            shard = ShardInfo(name=name, count=len(chunk), sha256=_sha256(data), bytes=len(data))
            skipped = False
        info.shards.append(shard)
        info.count += shard.count
        if on_shard is not None:
            on_shard(shard, skipped)
    return info


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def verify_shards(folder: Path, split: SplitInfo) -> list[str]:
    """Names of shards that are missing or whose sha256 differs from the manifest."""
    return [s.name for s in split.shards
            if not (folder / s.name).is_file() or sha256_file(folder / s.name) != s.sha256]

