"""WebDataset shards: URLs, reading samples out of a tar stream, and writing shards atomically.

A shard is a plain tar file (`{split}-{index:06d}.tar`) whose members are `{key}.{ext}`; the members
of one sample are adjacent. Extensions used by scalegen: `npy` (a uint8 [C, H, W] image, built-in
datasets), `png`/`jpg` (image, packed folders), `wav` (audio), `cls` (integer label as text), `json` (other
fields, e.g. the FSDD speaker), `crc32` (checksum of the others, in every sample scalegen writes).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import shlex
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import webdataset as wds
from webdataset.shardlists import expand_urls as _wds_expand_urls

from scalegen.data.manifest import (
    FORMAT,
    MANIFEST,
    DataError,
    Manifest,
    ShardInfo,
    SplitInfo,
    atomic_write_bytes,
    sha256_file,
)

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
        import fsspec  # only for remote URLs
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
    import fsspec  # only for remote URLs

    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.exists(path))


def read_manifest(root: str) -> Manifest:
    """The manifest in `root` (a local folder or an fsspec URL such as s3://bucket/digits)."""
    url = root.rstrip("/") + "/" + MANIFEST
    try:
        with open_url(url) as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        raise DataError(
            f"no {MANIFEST} in {root}: prepare the shards first (`scalegen data prepare NAME --out {root}` "
            f"or `scalegen data pack SRC --out {root}`), or set data.root to the folder that holds them"
        ) from None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {url}: {err}") from None
    if data.get("format") != FORMAT:
        raise DataError(f"{url} has format {data.get('format')!r}, not {FORMAT!r}; re-prepare the shards")
    return Manifest.from_dict(data)


# ---- reading -----------------------------------------------------------------------------------
COMPRESSED = {".tar.gz": gzip.GzipFile, ".tgz": gzip.GzipFile, ".tar.bz2": bz2.BZ2File, ".tar.xz": lzma.LZMAFile}


def iter_shard(url: str, on_damage: Callable[[str], None] | None = None) -> Iterator[Sample]:
    """The samples of one shard in order: {"__key__": key, ext: bytes, ...}. Damage (a corrupt header, a
    truncated end) is reported to `on_damage(message)` and costs only the members it hit (`read_members`);
    without `on_damage` it raises `TarError`. `.tar.gz`, `.tgz`, `.tar.bz2` and `.tar.xz` are decompressed."""
    def report(message: str) -> None:
        if on_damage is None:
            raise TarError(f"shard {url}: {message}")
        on_damage(f"shard {url}: {message}")

    with open_url(url) as stream:
        kind = next((c for suffix, c in COMPRESSED.items() if shard_name(url).endswith(suffix)), None)
        source = kind(fileobj=stream) if kind is not None else stream
        yield from group_members(read_members(source, report))


class TarError(ValueError):
    """A tar stream that is truncated or corrupt."""


_ZERO_BLOCK = bytes(512)


def _header_ok(header: bytes) -> bool:
    """Whether a 512-byte block is a tar header: its checksum (the byte sum with the checksum field counted
    as spaces) matches. Adler-32's low half is 1 + the byte sum mod 65521: the same test, in C."""
    return zlib.adler32(header) & 0xFFFF == _expected_adler(header[148:156])


def _expected_adler(field: bytes) -> int:
    """The low half of adler32(header) for a header whose checksum field is `field` (-1: not a number)."""
    try:
        stored = int(field[:7].rstrip(b"\0"), 8)  # 6 or 7 octal digits, then NUL and/or space (int() strips spaces)
    except ValueError:
        return -1
    return (1 + stored - 256 + sum(field)) % 65521


def _member_size(field: bytes) -> int:
    """The size field's value (-1: not a number, a damaged header)."""
    if field[0] & 0x80:  # GNU base-256 for members of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        return -1


def read_members(
    stream: IO[bytes], on_damage: Callable[[str], None], chunk: int = 16 << 20
) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in an uncompressed tar stream (ustar, pax and GNU long names).

    A block that should be a header and fails its checksum is damage: the reader scans the following
    512-byte blocks for the next one that passes and goes on from there (`on_damage` names both byte
    offsets); a stream that ends inside a header or member loses only what is missing.
    """
    buf, base, pos, eof = b"", 0, 0, False  # base: the stream offset of buf[0] (always a multiple of 512)

    def refill(n: int) -> bool:
        """Buffer at least n bytes from pos if the stream has them."""
        nonlocal buf, base, pos, eof
        while len(buf) - pos < n and not eof:
            more = stream.read(max(chunk, n))
            eof = not more
            buf, base, pos = buf[pos:] + more, base + pos, 0
        return len(buf) - pos >= n

    long_name: str | None = None
    adler, known_fields = zlib.adler32, {}
    while True:
        if len(buf) - pos < 512 and not refill(512):
            if len(buf) != pos:  # part of a header, or a member's padding, is missing
                on_damage(f"truncated at byte {base + len(buf) - pos} (not a multiple of 512)"
                          if len(buf) > pos else "truncated inside the padding of its last member")
            return  # (a writer that omitted the end-of-archive blocks ends here too)
        header = buf[pos : pos + 512]
        if header == _ZERO_BLOCK:
            return  # end of archive
        # The checksum test of _header_ok, inline (it is the per-member cost of reading): the adler-32 half a
        # good header has follows from its checksum field alone, and the size, mtime and checksum fields of a
        # shard's headers take few distinct values: both parses are looked up, not repeated, per member.
        fields = header[124:156]
        known = known_fields.get(fields)
        if known is None:
            known = _expected_adler(fields[24:]), _member_size(fields[:12])
            if len(known_fields) < 4096:
                known_fields[fields] = known
        expected, size = known
        if adler(header) & 0xFFFF != expected or size < 0:
            bad = base + pos
            pos += 512
            while refill(512) and (buf[pos : pos + 512] == _ZERO_BLOCK or not _header_ok(buf[pos : pos + 512])):
                pos += 512
            if len(buf) - pos < 512:
                on_damage(f"corrupt tar header at byte {bad}, no valid header after it")
                return
            on_damage(f"corrupt tar header at byte {bad}, reading on from the next valid one at byte {base + pos}")
            long_name = None
            continue
        padded = size + (-size % 512)
        if len(buf) - pos < 512 + padded and not refill(512 + padded) and len(buf) - pos < 512 + size:
            on_damage(f"truncated at byte {base + len(buf) - pos}, inside a member of {size} bytes")
            return
        data = buf[pos + 512 : pos + 512 + size]
        pos += 512 + padded
        kind = header[156]
        if kind in (48, 0, 55):  # b"0", b"\0", b"7": a regular file
            if long_name is not None:
                name, long_name = long_name, None
            else:
                name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
                if header[345] and header[257:262] == b"ustar":
                    name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
            yield name, data
        elif kind == 76:  # b"L": GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == 120:  # b"x": pax extended header of the next member
            long_name = _pax_path(data) or long_name
        # other kinds (directories, links, global pax headers) carry no sample data


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").splitlines():
        _, _, keyvalue = record.partition(" ")
        if keyvalue.startswith("path="):
            return keyvalue[len("path=") :]
    return None


def group_members(members: Iterable[tuple[str, bytes]]) -> Iterator[Sample]:
    """Adjacent members with the same key (the path up to the first dot of the file name) form a sample
    (WebDataset's rule); members without an extension and WebDataset metadata (`__*`) are ignored."""
    sample: Sample = {}
    key = None
    for name, data in members:
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        if dot < 0 or name.startswith("__", slash):
            continue
        ext = name[dot + 1 :]
        if not ext.islower():
            ext = ext.lower()
        if key is None or not name.startswith(key) or len(key) != dot or ext in sample:
            if key is not None:
                yield sample
            key = name[:dot]
            sample = {"__key__": key}
        sample[ext] = data
    if key is not None:
        yield sample


def sample_crc(sample: Sample) -> str:
    """The `crc32` member scalegen writes into every sample: CRC-32 of the other members, in extension order
    (raw `.npy` pixels carry no checksum of their own; this one makes damage to any member detectable)."""
    crc = 0
    for ext in sorted(sample):
        if ext != "crc32" and ext[:2] != "__":
            crc = zlib.crc32(sample[ext], crc)
    return f"{crc:08x}"


# ---- writing -----------------------------------------------------------------------------------
def shard_file_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def tar_bytes(samples: Iterable[Sample]) -> bytes:
    """One shard as bytes, each sample with its `crc32` member; deterministic (fixed mtime, owner and mode)
    so a re-run reproduces it exactly."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0, user="scalegen", group="scalegen", mode=0o0444) as writer:
        for sample in samples:
            sample = {k: v for k, v in sample.items() if k != "crc32"}
            writer.write({**sample, "crc32": sample_crc(sample).encode()})
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

    return hashlib.sha256(data).hexdigest()
