"""The streaming tar reader against Python's tarfile: every format, long names, chunk boundaries, damage."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from scalegen.data import shards
from scalegen.data.shards import TarError, group_member_runs, group_members, read_tar, tar_bytes


def _archive(fmt: int, names: list[str], sizes: list[int]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(_dir("somedir"))
        for name, size in zip(names, sizes):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(i % 251 for i in range(size))))
    return buf.getvalue()


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def _read(data: bytes, chunk: int, whole: bool) -> list[tuple[str, bytes]]:
    """Read as a stream (in chunks), or as an archive held whole in memory (a mapped local shard: `chunk`
    is then the window each vectorized scan covers)."""
    return list(read_tar(data if whole else io.BytesIO(data), chunk=chunk))


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("chunk", [700, 1 << 20])
def test_reads_what_tarfile_reads(fmt: int, chunk: int, whole: bool) -> None:
    long = "" if fmt == tarfile.USTAR_FORMAT else "x" * 150 + "/"
    names = [f"a/{long}s1.cls", f"a/{long}s1.png", "s2.cls", "s2.wav", "deep/er/s3.json"]
    sizes = [0, 513, 1, 5000, 512]
    data = _archive(fmt, names, sizes)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    assert _read(data, chunk, whole) == expected
    samples = list(group_members(expected))
    assert [s["__key__"] for s in samples] == [f"a/{long}s1", "s2", "deep/er/s3"]
    assert set(samples[1]) == {"__key__", "cls", "wav"}


@pytest.mark.parametrize("whole", [False, True])
def test_truncation_and_corruption_raise(whole: bool) -> None:
    data = tar_bytes([{"__key__": f"k{i}", "cls": b"1", "png": bytes(900)} for i in range(4)])
    with pytest.raises(TarError, match="truncated tar member"):
        _read(data[: 512 * 3 + 100], 1 << 20, whole)  # inside the second member's data
    with pytest.raises(TarError, match="truncated tar header"):
        _read(data[: 512 * 2 + 100], 1 << 20, whole)
    bad = bytearray(data)
    bad[512 * 2 + 124 : 512 * 2 + 136] = b"not a number"  # the size field of the second member
    with pytest.raises(TarError, match="corrupt tar header"):
        _read(bytes(bad), 1 << 20, whole)


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("chunk", [1536, 4096, 1 << 20])
def test_members_that_look_like_headers_do_not_fool_the_vectorized_scan(chunk: int, whole: bool) -> None:
    """A member holding a tar archive has blocks with the ustar magic inside its data; the reader must
    still return exactly what tarfile returns, for any chunk boundary."""
    inner = tar_bytes([{"__key__": f"in{i}", "cls": b"7", "png": bytes(range(200)) * 3} for i in range(3)])
    samples = [
        {"__key__": "a", "cls": b"1", "tar": inner},
        {"__key__": "b", "cls": b"2", "png": bytes(1000)},
        {"__key__": "c", "tar": inner[:1024] + bytes(100)},  # a header block, then an unrelated tail
        {"__key__": "d", "cls": b"4"},
    ]
    data = tar_bytes(samples)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    assert len(expected) == 6
    assert _read(data, chunk, whole) == expected


def test_local_shards_are_mapped_and_read_as_streams_are(tmp_path) -> None:
    """A local shard is read from a memory map; its samples equal those read through a pipe (a stream)."""
    samples = [{"__key__": f"k{i:03d}", "cls": str(i).encode(), "png": bytes([i % 256]) * (i * 37)} for i in range(300)]
    path = tmp_path / "train-000000.tar"
    path.write_bytes(tar_bytes(samples))
    with open(path, "rb") as f:
        assert shards._map_local_file(f) is not None
    mapped = list(shards.iter_shard(str(path)))
    assert mapped == list(shards.iter_shard(f"pipe:cat {path}")) == samples
    assert all(isinstance(v, bytes) for s in mapped for k, v in s.items() if k != "__key__")  # copies, not views
    (tmp_path / "empty.tar").write_bytes(b"")
    with open(tmp_path / "empty.tar", "rb") as f:
        assert shards._map_local_file(f) is None  # nothing to map: read as a stream (which ends at once)


shards_uniform = shards._uniform_samples
shards_scan = shards._scan_run


def _reference_grouping(members: list[tuple[str, bytes]]) -> list[dict]:
    """WebDataset's rule written plainly: the key is the path up to the first dot of the file name."""
    samples: list[dict] = []
    for name, data in members:
        folder, _, base = name.rpartition("/")
        if "." not in base or base.startswith("__"):
            continue
        key = (folder + "/" if folder else "") + base.split(".", 1)[0]
        if not samples or samples[-1]["__key__"] != key:
            samples.append({"__key__": key})
        samples[-1][base.split(".", 1)[1].lower()] = data
    return samples


@pytest.mark.parametrize("seed", range(6))
def test_grouping_runs_equals_the_plain_rule_however_the_runs_are_cut(seed: int, monkeypatch) -> None:
    """Uniform stretches (built in one comprehension) and irregular members (one by one), cut into runs at
    random places, group exactly as the plain rule does."""
    rng = random.Random(seed)
    members: list[tuple[str, bytes]] = []
    for i in range(300):
        if i % 50 < 45:
            exts = ["cls", "png"]  # the common layout, in long stretches
        else:
            exts = rng.choice([["png"], ["cls", "png", "json"], ["seg.png", "PNG"], ["wav"]])
        folder = "d.ir/" if rng.random() < 0.05 else ""
        members += [(f"{folder}k{i:04d}.{e}", bytes([i % 256, j])) for j, e in enumerate(exts)]
        if rng.random() < 0.02:
            members.append(("__meta__.json", b"{}"))
    cuts = sorted(rng.sample(range(1, len(members)), 12))
    names, datas = [name for name, _ in members], [data for _, data in members]
    runs = [(names[a:b], datas[a:b]) for a, b in zip([0, *cuts], [*cuts, len(members)])]
    uniform = []
    monkeypatch.setattr(shards, "_uniform_samples", lambda *a: uniform.append(shards_uniform(*a)) or uniform[-1])
    got = [s for chunk in group_member_runs(runs) for s in chunk]
    assert got == _reference_grouping(members)
    assert sum(used for _, used in uniform) > 0  # the fast path took part
    assert [s for s in group_members(members)] == got


@pytest.mark.parametrize("mtime", [0, 1.5])
def test_pax_shards_and_short_runs_keep_the_scan_cheap(mtime: float, monkeypatch) -> None:
    """`tarfile` writes a pax header before every member when mtimes are fractional (WebDataset's TarWriter
    by default): those shards read in long runs like plain ones. A shard whose runs stay short (a GNU
    long name every other member) falls back to member-by-member reading instead of a scan per member."""
    def archive(names: list[str]) -> bytes:
        buf = io.BytesIO()
        fmt = tarfile.GNU_FORMAT if mtime == 0 else tarfile.PAX_FORMAT
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for i, name in enumerate(names):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = 3, mtime
                tar.addfile(info, io.BytesIO(b"%03d" % (i % 1000)))
        return buf.getvalue()

    long = "n" * 120
    names = [f"k{i:05d}.cls" for i in range(2000)] if mtime else [
        f"{long if i % 2 else ''}k{i:05d}.cls" for i in range(2000)
    ]
    data = archive(names)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    calls = []
    monkeypatch.setattr(shards, "_scan_run", lambda *a: calls.append(1) or shards_scan(*a))
    assert list(read_tar(io.BytesIO(data), chunk=1 << 16)) == expected
    assert len(calls) <= 3 * (len(data) >> 16) + 3  # a few scans per buffer of 64 KiB, not one per member
