"""The streaming tar reader against Python's tarfile: every format, long names, chunk boundaries, damage."""

from __future__ import annotations

import io
import tarfile

import pytest

from scalegen.data.shards import TarError, group_members, read_tar, tar_bytes


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


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("chunk", [700, 1 << 20])
def test_reads_what_tarfile_reads(fmt: int, chunk: int) -> None:
    long = "" if fmt == tarfile.USTAR_FORMAT else "x" * 150 + "/"
    names = [f"a/{long}s1.cls", f"a/{long}s1.png", "s2.cls", "s2.wav", "deep/er/s3.json"]
    sizes = [0, 513, 1, 5000, 512]
    data = _archive(fmt, names, sizes)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    assert list(read_tar(io.BytesIO(data), chunk=chunk)) == expected
    samples = list(group_members(expected))
    assert [s["__key__"] for s in samples] == [f"a/{long}s1", "s2", "deep/er/s3"]
    assert set(samples[1]) == {"__key__", "cls", "wav"}


def test_truncation_and_corruption_raise() -> None:
    data = tar_bytes([{"__key__": f"k{i}", "cls": b"1", "png": bytes(900)} for i in range(4)])
    with pytest.raises(TarError, match="truncated tar member"):
        list(read_tar(io.BytesIO(data[: 512 * 3 + 100])))  # inside the second member's data
    with pytest.raises(TarError, match="truncated tar header"):
        list(read_tar(io.BytesIO(data[: 512 * 2 + 100])))
    bad = bytearray(data)
    bad[512 * 2 + 124 : 512 * 2 + 136] = b"not a number"  # the size field of the second member
    with pytest.raises(TarError, match="corrupt tar header"):
        list(read_tar(io.BytesIO(bytes(bad))))
