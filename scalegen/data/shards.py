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
    """The shard's file name, which keys it in the manifest (`pipe:` URLs: the last word naming a .tar)."""
    if _scheme(url) == "pipe":
        words = shlex.split(url[len("pipe:") :])
        url = next((w for w in reversed(words) if ".tar" in w), words[-1])
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
    """The samples of one shard in order: {"__key__": key, ext: bytes, ...}.

    Plain tar files (what scalegen writes) go through `read_tar`, a small streaming ustar reader that
    is several times faster than `tarfile` per member; compressed shards (.tar.gz etc.) go through
    WebDataset's tarfile-based reader. Errors (missing, truncated, corrupt) propagate to the caller.
    """
    stream = open_url(url)
    try:
        head = stream.read(512)
        if head[:2] in (b"\x1f\x8b", b"BZ") or head[:6] == b"\xfd7zXZ\x00":
            members = ({**m, "__url__": url} for m in tar_file_iterator(_Prefixed(head, stream)))
            for sample in group_by_keys(members):
                sample.pop("__url__", None)
                yield sample
        else:
            yield from group_members(read_tar(_Prefixed(head, stream)))
    finally:
        stream.close()


class _Prefixed(io.RawIOBase):
    """A read-only stream that replays `head` before the rest of `stream` (we peeked at the magic)."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        if len(out) < n:
            out += self.stream.read(n - len(out))
        return out

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class TarError(ValueError):
    """A tar stream that is truncated or corrupt."""


def read_tar(stream: IO[bytes], chunk: int = 1 << 20) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in an uncompressed tar stream (ustar, pax and GNU long names).

    Reads the stream in large chunks and slices members out of them (few Python calls per member: the
    common case, a whole member already buffered, touches no helper). Headers without the ustar magic
    must pass the header checksum; a stream that ends inside a header or a member, or a header whose
    fields do not parse, raises `TarError`.
    """
    buf, pos, eof = b"", 0, False

    def refill(n: int) -> None:
        """Read until at least n bytes from pos are buffered, or the stream ends."""
        nonlocal buf, pos, eof
        while len(buf) - pos < n and not eof:
            more = stream.read(max(chunk, n))
            eof = not more
            buf, pos = buf[pos:] + more, 0

    long_name: str | None = None
    while True:
        if len(buf) - pos < 512:
            refill(512)
            if len(buf) - pos < 512:
                if len(buf) - pos == 0:
                    return  # a writer that omitted the end-of-archive blocks
                raise TarError(f"truncated tar header ({len(buf) - pos} of 512 bytes)")
        header = buf[pos : pos + 512]
        ustar = header[257:262] == b"ustar"
        try:
            if not ustar:  # old-style header: only the checksum vouches for it
                if header == _ZERO_BLOCK:
                    return  # end of archive
                stored = int(header[148:156].split(b"\0", 1)[0].strip(), 8)
                # The checksum is the byte sum with the checksum field counted as 8 spaces (8 * 32).
                if stored != sum(header) - sum(header[148:156]) + 256:
                    raise TarError("bad tar header checksum (corrupt shard)")
            size_field = header[124:136]
            size = (
                int.from_bytes(size_field[1:], "big")
                if size_field[0] & 0x80
                else int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
            )
        except ValueError as err:
            raise TarError(f"corrupt tar header: {err}") from None
        padded = size + (-size % 512)
        if len(buf) - pos < 512 + padded:
            refill(512 + padded)
            if len(buf) - pos < 512 + size:
                raise TarError(f"truncated tar member ({len(buf) - pos - 512} of {size} bytes)")
        data = buf[pos + 512 : pos + 512 + size]
        pos += 512 + padded
        kind = header[156]
        if kind in (48, 0, 55):  # b"0", b"\0", b"7": a regular file
            if long_name is not None:
                name, long_name = long_name, None
            else:
                name = header[:100].split(b"\0", 1)[0].decode()
                if ustar and header[345]:
                    name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
            yield name, data
        elif kind == 76:  # b"L": GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode()
        elif kind == 120:  # b"x": pax extended header of the next member
            for record in data.decode("utf-8").splitlines():
                _, _, keyvalue = record.partition(" ")
                if keyvalue.startswith("path="):
                    long_name = keyvalue[len("path=") :]
        # other kinds (directories, links, global pax headers) carry no sample data


_ZERO_BLOCK = bytes(512)


def group_members(members: Iterable[tuple[str, bytes]]) -> Iterator[Sample]:
    """Adjacent members with the same key (the path up to the first dot of the file name) form a sample."""
    sample: Sample | None = None
    for name, data in members:
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        if dot < 0 or name[slash:].startswith("__"):
            continue  # no extension, or WebDataset metadata
        key, ext = name[:dot], name[dot + 1 :].lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        if ext in sample:
            raise TarError(f"duplicate member {name} in one sample")
        sample[ext] = data
    if sample is not None:
        yield sample


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
    return [s.name for s in split.shards if not (folder / s.name).is_file() or sha256_file(folder / s.name) != s.sha256]
