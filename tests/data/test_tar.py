"""The tar reader against Python's tarfile: every format, long names, chunk boundaries, compressed shards,
and damage: a corrupt header costs only the members it hit, a truncated stream only what is missing."""

from __future__ import annotations

import gzip
import io
import random
import tarfile

import pytest

from scalegen.data import shards
from scalegen.data.shards import TarError, group_members, read_members, sample_crc, tar_bytes


def _archive(fmt: int, names: list[str], sizes: list[int]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, size in zip(names, sizes):
            info = tarfile.TarInfo(name)
            info.size = size
            info.mtime = 1.5  # fractional: tarfile's pax format then adds a header before every member
            tar.addfile(info, io.BytesIO(bytes(i % 251 for i in range(size))))
    return buf.getvalue()


def _read(data: bytes, chunk: int = 1 << 20) -> tuple[list[tuple[str, bytes]], list[str]]:
    damage: list[str] = []
    return list(read_members(io.BytesIO(data), damage.append, chunk=chunk)), damage


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("chunk", [700, 1 << 20])
def test_reads_what_tarfile_reads(fmt: int, chunk: int) -> None:
    long = "" if fmt == tarfile.USTAR_FORMAT else "x" * 150 + "/"
    names = [f"a/{long}s1.cls", f"a/{long}s1.png", "s2.cls", "s2.wav", "deep/er/s3.json", "s4.with.dots.png"]
    sizes = [0, 513, 1, 5000, 512, 3]
    data = _archive(fmt, names, sizes)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    assert _read(data, chunk) == (expected, [])
    samples = list(group_members(expected))
    assert [s["__key__"] for s in samples] == [f"a/{long}s1", "s2", "deep/er/s3", "s4"]
    assert set(samples[1]) == {"__key__", "cls", "wav"} and set(samples[3]) == {"__key__", "with.dots.png"}


def _shard(n: int = 40) -> tuple[bytes, list[dict]]:
    samples = [{"__key__": f"k{i:03d}", "cls": str(i).encode(), "npy": bytes([i]) * (100 + 37 * i)} for i in range(n)]
    return tar_bytes(samples), samples


def _sizes(data: bytes) -> dict[str, int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m.size for m in tar.getmembers()}


def _offsets(data: bytes) -> dict[str, tuple[int, int]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data + m.size + (-m.size % 512)) for m in tar.getmembers()}


@pytest.mark.parametrize("seed", range(5))
def test_a_corrupt_stretch_costs_only_the_members_it_touches(seed: int) -> None:
    data, _ = _shard()
    rng = random.Random(seed)
    start = rng.randrange(2048, len(data) - 8192)
    length = rng.choice([1, 100, 4096])
    bad = bytearray(data)
    bad[start : start + length] = rng.randbytes(length)
    got, damage = _read(bytes(bad), chunk=rng.choice([1024, 1 << 20]))
    touched = {name for name, (a, b) in _offsets(data).items() if a < start + length and b > start}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        intact = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.name not in touched]
    read = dict(got)
    assert all(read.get(name) == blob for name, blob in intact)  # every untouched member, unchanged
    assert set(read) <= {n for n, _ in intact} | touched
    sizes = _sizes(data)
    assert all(len(read[name]) == sizes[name] for name in set(read) & touched)  # framing intact, data hit
    headers_hit = any(a < start + length and a + 512 > start for a, _ in _offsets(data).values())
    assert bool(damage) == headers_hit and all("corrupt tar header at byte" in d for d in damage)


def test_a_header_whose_checksum_passes_but_whose_size_is_not_a_number_is_damage() -> None:
    data, _ = _shard()
    offsets = _offsets(data)
    name = sorted(offsets, key=lambda n: offsets[n][0])[4]  # a member in the middle
    a = offsets[name][0]
    header = bytearray(data[a : a + 512])
    header[124:136] = b"9zz99999999\0"  # not octal
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()  # a checksum that passes (tarfile's rule)
    got, damage = _read(data[:a] + bytes(header) + data[a + 512 :])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != name]
    assert got == expected  # only that member is lost (its data blocks are skipped as non-headers)
    assert len(damage) == 1 and f"corrupt tar header at byte {a}" in damage[0]


def test_truncation_loses_only_what_is_missing_and_raises_without_a_handler(tmp_path) -> None:
    data, samples = _shard()
    last = max(a for a, _ in _offsets(data).values())  # the last member's header
    for cut in (512 * 3 + 100, len(data) // 2, last + 512 + 10, last + 300):
        got, damage = _read(data[:cut])
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            complete = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.offset_data + m.size <= cut]
        assert got == complete and len(damage) == 1  # every member whose bytes are all there, and one report
    path = tmp_path / "t.tar"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TarError, match="t.tar"):
        list(shards.iter_shard(str(path)))
    assert list(shards.iter_shard(str(path), on_damage=lambda m: None))  # what is there is read


def test_compressed_and_piped_shards_read_as_plain_ones(tmp_path) -> None:
    data, samples = _shard(10)
    (tmp_path / "a.tar").write_bytes(data)
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(data))
    plain = list(shards.iter_shard(str(tmp_path / "a.tar")))
    assert plain == list(shards.iter_shard(str(tmp_path / "a.tar.gz"))) == list(
        shards.iter_shard(f"pipe:cat {tmp_path / 'a.tar'}"))
    assert [{k: v for k, v in s.items() if k != "crc32"} for s in plain] == samples
    assert all(s["crc32"] == sample_crc(s).encode() for s in plain)  # every written sample carries its checksum
