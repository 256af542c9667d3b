"""WebDataset shards: URLs, reading samples out of a tar stream, and writing shards atomically.

A shard is a plain tar file (`{split}-{index:06d}.tar`) whose members are `{key}.{ext}`; the members
of one sample are adjacent. Extensions used by scalegen: `png`/`jpg` (image), `wav` (audio), `cls`
(integer label as text), `json` (other fields, e.g. the FSDD speaker).
"""

from __future__ import annotations

import io
import mmap
import os
import shlex
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
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
    """The samples of one shard in order: {"__key__": key, ext: bytes, ...}."""
    for chunk in iter_shard_chunks(url):
        yield from chunk


def iter_shard_chunks(url: str) -> Iterator[list[Sample]]:
    """The samples of one shard in order, in lists of consecutive samples (the loader's stages handle lists:
    one generator step per list instead of one per sample).

    Plain tar files (what scalegen writes) go through `read_tar_runs`, a small streaming ustar reader that
    is several times faster than `tarfile` per member; a local one is mapped into memory rather than read
    through a buffer. Compressed shards (.tar.gz etc.) go through WebDataset's tarfile-based reader.
    Errors (missing, truncated, corrupt) propagate to the caller.
    """
    stream = open_url(url)
    mapped = None
    try:
        head = stream.read(512)
        if head[:2] in (b"\x1f\x8b", b"BZ") or head[:6] == b"\xfd7zXZ\x00":
            members = ({**m, "__url__": url} for m in tar_file_iterator(_Prefixed(head, stream)))
            for sample in group_by_keys(members):
                sample.pop("__url__", None)
                yield [sample]
        else:
            mapped = _map_local_file(stream)
            yield from group_member_runs(read_tar_runs(mapped if mapped is not None else _Prefixed(head, stream)))
    finally:
        if mapped is not None:
            try:
                mapped.close()
            except BufferError:  # an abandoned reader's arrays still view it: the collector unmaps it
                pass
        stream.close()


def _map_local_file(stream: IO[bytes]) -> mmap.mmap | None:
    """The whole file behind `stream`, mapped read-only, when it is a non-empty regular file; else None.
    Members are then sliced straight out of the page cache: one copy of every byte fewer than reading
    into a buffer and carrying the buffer's tail into the next one (~0.5 of ~3 us per CIFAR-10 sample)."""
    try:
        fd = stream.fileno()
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            return None
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (AttributeError, OSError, ValueError):  # no file descriptor (pipes, fsspec), or not mappable
        return None
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_SEQUENTIAL)  # read ahead, as for a stream
    return mapped


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
    """(name, data) of every regular file in an uncompressed tar stream (see `read_tar_runs`)."""
    for names, datas in read_tar_runs(stream, chunk):
        yield from zip(names, datas)


MemberRun = tuple[list[str], list[bytes]]  # the names and the data of consecutive tar members


def read_tar_runs(source: IO[bytes] | bytes | mmap.mmap, chunk: int = 1 << 20) -> Iterator[MemberRun]:
    """The names and data of every regular file in an uncompressed tar stream (ustar, pax and GNU long
    names), in runs of consecutive members. `source` is a stream, or the whole archive in memory (bytes, a
    mapped file).

    Reads a stream in chunks of `chunk` bytes. Runs of plain ustar members (what WebDataset and `tarfile`
    write for short names) are located in one vectorized pass over the headers of a chunk (`_scan_run`);
    anything else goes through the member-by-member parser below. Headers without the ustar magic must
    pass the header checksum; an archive that ends inside a header or a member, or a header whose fields
    do not parse, raises `TarError`.
    """
    whole = isinstance(source, (bytes, mmap.mmap))
    stream: Any = None if whole else source
    buf, pos, eof = (source, 0, True) if whole else (b"", 0, False)

    def refill(n: int) -> None:
        """Read until at least n bytes from pos are buffered, or the stream ends."""
        nonlocal buf, pos, eof
        while len(buf) - pos < n and not eof:
            more = stream.read(max(chunk, n))
            eof = not more
            buf, pos = buf[pos:] + more, 0

    long_name: str | None = None
    one_by_one, backoff = 0, 4  # after a short run, members to parse one by one before scanning again
    while True:
        if long_name is None and one_by_one <= 0:
            found = _scan_run(buf, pos, chunk)
            if found is None and len(buf) - pos < chunk // 2 and not eof:
                # The scan takes every whole member, so what is left to carry into the new buffer is short.
                refill(chunk)
                found = _scan_run(buf, pos, chunk)
            if found is not None:
                names, starts, sizes, pax, end = found
                datas = [buf[a : a + n] for a, n in zip(starts, sizes)]
                yield (names, datas) if pax is None else _apply_pax(names, datas, pax)
                pos = end
                if len(names) >= 8:
                    backoff = 4
                    continue
            # Nothing or little to scan here (another member type, a member larger than the buffer): parse
            # the next members one by one, for longer each time, so a shard that never has long runs does
            # not pay for a vectorized scan per member.
            one_by_one, backoff = backoff, min(2 * backoff, 1024)
            if found is not None:
                continue
        if len(buf) - pos < 512:
            refill(512)
            if len(buf) - pos < 512:
                if len(buf) - pos == 0:
                    return  # a writer that omitted the end-of-archive blocks
                raise TarError(f"truncated tar header ({len(buf) - pos} of 512 bytes)")
        header = buf[pos : pos + 512]
        one_by_one -= 1
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
            yield [name], [data]
        elif kind == 76:  # b"L": GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode()
        elif kind == 120:  # b"x": pax extended header of the next member
            long_name = _pax_path(data) or long_name
        # other kinds (directories, links, global pax headers) carry no sample data


_OCTAL_PLACES = 8 ** np.arange(10, -1, -1, dtype=np.int64)


Scan = tuple[list[str], list[int], list[int], list[bool] | None, int]  # names, offsets, sizes, pax flags, end


def _scan_run(buf: bytes | mmap.mmap, pos: int, window: int) -> Scan | None:
    """The longest run of members starting at `pos` that are ustar regular files
    (11-digit octal size, no name prefix) or pax headers for them, lying wholly inside `buf[pos:pos + window]`:
    (names, data offsets, sizes, which are pax headers (None if none), end of the run); None if empty.

    Every 512-byte block with the ustar magic is a candidate header; the candidates form the run as long as
    each one starts exactly where the previous member's data ends. A data block that merely looks like a
    header breaks that chain, so it can shorten a run but never enter it. The caller's member-by-member
    parser takes whatever is not in a run.
    """
    if buf[pos + 257 : pos + 262] != b"ustar" or buf[pos + 156 : pos + 157] not in (b"0", b"\0", b"x"):
        return None  # cheap check first: the scan below costs ~20 us of numpy calls whatever it finds
    nblocks = min(len(buf) - pos, window) // 512
    if nblocks < 2:
        return None
    blocks = np.frombuffer(buf, np.uint8, count=nblocks * 512, offset=pos).reshape(nblocks, 512)
    cand = np.flatnonzero(blocks[:, 257] == 117)  # b"u", the first byte of the ustar magic
    heads = blocks[cand]
    magic = (heads[:, 258] == 115) & (heads[:, 259] == 116) & (heads[:, 260] == 97) & (heads[:, 261] == 114)
    if not magic.all():  # b"star" too
        cand, heads = cand[magic], heads[magic]
    if len(cand) == 0 or cand[0] != 0:
        return None
    digits = heads[:, 124:135] - np.uint8(48)  # the size: 11 octal digits (wrapping below "0" makes them > 7)
    pax = heads[:, 156] == 120  # b"x": a pax header, whose records apply to the next member
    plain = (
        (digits <= 7).all(1)
        & ((heads[:, 135] == 0) | (heads[:, 135] == 32))  # then NUL or space
        & ((heads[:, 156] == 48) | (heads[:, 156] == 0) | pax)  # regular files (and their pax headers)
        & (heads[:, 345] == 0)  # no ustar name prefix
    )
    sizes = digits.astype(np.int64) @ _OCTAL_PLACES
    following = cand + 1 + (sizes + 511) // 512  # where the next header must be
    ok = plain & (following <= nblocks)
    ok[:-1] &= cand[1:] == following[:-1]
    bad = np.flatnonzero(~ok)
    # A member with a broken link to its successor is still whole: the run includes it if it is plain and
    # inside the buffer (only its successor is in doubt).
    n = len(cand) if len(bad) == 0 else int(bad[0]) + bool(plain[bad[0]] and following[bad[0]] <= nblocks)
    while n > 0 and pax[n - 1]:
        n -= 1  # a pax header goes with its member, in the same run
    if n == 0:
        return None
    names = [b.decode() for b in np.ascontiguousarray(heads[:n, :100]).view("S100").ravel().tolist()]
    starts = (pos + 512 * (cand[:n] + 1)).tolist()
    flags = pax[:n].tolist() if pax[:n].any() else None
    return names, starts, sizes[:n].tolist(), flags, pos + 512 * int(following[n - 1])


def _apply_pax(names: list[str], datas: list[bytes], pax: list[bool]) -> MemberRun:
    """The members of a run with pax headers: each header's `path` record renames the member after it (what
    `tarfile` writes for long or non-ASCII names, and for every member when mtimes are fractional)."""
    out_names, out_datas, path = [], [], None
    for name, data, is_pax in zip(names, datas, pax):
        if is_pax:
            path = _pax_path(data)
            continue
        out_names.append(path if path is not None else name)
        out_datas.append(data)
        path = None
    return out_names, out_datas


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8").splitlines():
        _, _, keyvalue = record.partition(" ")
        if keyvalue.startswith("path="):
            return keyvalue[len("path=") :]
    return None


_ZERO_BLOCK = bytes(512)


def group_members(members: Iterable[tuple[str, bytes]]) -> Iterator[Sample]:
    """Adjacent members with the same key (the path up to the first dot of the file name) form a sample."""
    pairs = list(members)
    for samples in group_member_runs([([name for name, _ in pairs], [data for _, data in pairs])]):
        yield from samples


def group_member_runs(runs: Iterable[MemberRun]) -> Iterator[list[Sample]]:
    """`group_members` over runs of members, yielding lists of the samples each run completed (a sample
    whose members continue in the next run is held until its key changes)."""
    sample: Sample = {}
    key, prefix = None, None  # the open sample's key and key + "."
    for names, datas in runs:
        done: list[Sample] = []
        start = 0
        while start < len(names) and _continues(prefix, names[start]):  # the open sample's last members
            _add_member(sample, names[start], len(prefix), datas[start])
            start += 1
        samples, used = _uniform_samples(names, datas, start)
        if samples:
            if key is not None:
                done.append(sample)
            done.extend(samples[:-1])
            sample = samples[-1]  # stays open: more of its members may follow
            key = sample["__key__"]
            prefix = key + "."
            start += used
        for name, data in zip(names[start:], datas[start:]):
            if _continues(prefix, name):
                _add_member(sample, name, len(prefix), data)
                continue
            slash = name.rfind("/") + 1
            dot = name.find(".", slash)
            if dot < 0 or name.startswith("__", slash):
                continue  # no extension, or WebDataset metadata
            if key is not None:
                done.append(sample)
            key = name[:dot]
            prefix, sample = key + ".", {"__key__": key}
            _add_member(sample, name, dot + 1, data)
        if done:
            yield done
    if key is not None:
        yield [sample]


def _continues(prefix: str | None, name: str) -> bool:
    """Whether `name` is another member of the open sample: its key, a dot, and an extension without a
    slash (with a slash, the dot belonged to a folder name)."""
    return prefix is not None and name.startswith(prefix) and "/" not in name[len(prefix) :]


def _add_member(sample: Sample, name: str, ext_start: int, data: bytes) -> None:
    ext = name[ext_start:]
    if not ext.islower():
        ext = ext.lower()
    if ext in sample:
        raise TarError(f"duplicate member {name} in one sample")
    sample[ext] = data


def _uniform_samples(names: list[str], datas: list[bytes], start: int) -> tuple[list[Sample], int]:
    """(samples, members used) for the longest stretch of the run from `start` whose members come in groups
    with the same extensions in the same order and plain names (no folder, no metadata): what writers of
    shards produce. Those samples are built in one comprehension; the members after the stretch (a
    sample cut by the end of the run, anything irregular) are for the caller to group one by one, and it
    keeps the last sample open."""
    names = names[start:]
    joined = "\0" + "\0".join(names)
    for irregular in ("/", "\0__"):  # stop before the first name with a folder or of metadata
        at = joined.find(irregular)
        if at >= 0:
            joined = joined[: joined.rfind("\0", 0, at + 1)]
    names = names[: joined.count("\0")]
    if len(names) < 8:
        return [], 0
    if joined.count(".") == len(names):  # one dot per name (the usual case): split them all at once, in C
        words = joined[1:].replace(".", "\0").split("\0")
        keys, exts = words[0::2], words[1::2]
    else:
        parts = [name.partition(".") for name in names]
        keys = [p[0] for p in parts]
        exts = [p[2] for p in parts]
    width = 1  # members per sample
    while width < len(keys) and keys[width] == keys[0]:
        width += 1
    pattern = exts[:width]
    if len(set(pattern)) != width or "" in pattern or not all(map(str.islower, pattern)):
        return [], 0
    heads = keys[::width]

    def uniform(m: int) -> bool:  # the first m samples follow the pattern (list operations run in C)
        return all(
            keys[j : m * width : width] == heads[:m] and exts[j : m * width : width].count(pattern[j]) == m
            for j in range(width)
        ) and not any(map(str.__eq__, heads[: m - 1], heads[1:m]))  # no sample split into two

    lo = hi = len(keys) // width
    if not uniform(hi):  # irregular somewhere: the longest uniform prefix, by bisection (uniform(lo) holds)
        lo, hi = 0, hi - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if uniform(mid) else (lo, mid - 1)
    if lo < 2:
        return [], 0
    used = lo * width
    if width == 2:  # a label and the data: the usual layout, and a dict display is 4x faster than dict(zip())
        a, b = pattern
        first, second = datas[start : start + used : 2], datas[start + 1 : start + used : 2]
        return [{"__key__": k, a: x, b: y} for k, x, y in zip(heads, first, second)], used
    fields = ("__key__", *pattern)
    columns = (datas[start + j : start + used : width] for j in range(width))
    return [dict(zip(fields, values)) for values in zip(heads, *columns)], used


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
