"""Bad data: truncated shards and undecodable samples are skipped with a warning naming shard and key,
counted in `batch["skipped"]`, and good samples stand in for them (`batch["replaced"]`), decoded once or
streamed; `on_bad_sample=raise` makes them fatal; a missing shard fails up front."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from scalegen.config.schema import DataConfig
from scalegen.data import BadSampleWarning, DataError, build_datamodule
from scalegen.data.shards import iter_shard, tar_bytes


def _copy(digits_root: Path, dest: Path) -> Path:
    shutil.copytree(digits_root, dest, ignore=shutil.ignore_patterns(".*"))
    return dest


def _corrupt_one_sample(root: Path, key: str) -> None:
    path = root / "train-000000.tar"
    samples = list(iter_shard(str(path)))
    for s in samples:
        if s["__key__"] == key:
            s["npy"] = b"\x93NUMPY this is not an array"
    path.write_bytes(tar_bytes(samples))


def _run(root: Path, workers: int = 0, policy: str = "warn", cache: bool = True) -> tuple[list[str], list[int], int]:
    dm = build_datamodule(DataConfig(root=str(root), batch_size=64, num_workers=workers, on_bad_sample=policy,
                                     cache_bytes=(1 << 30) * cache, prepare=False))
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 22  # bad data never changes the step count
    assert sorted(len(b["key"]) for b in batches) == [61] * 17 + [62] * 5  # nor the batch sizes (1347 in 22)
    assert int(batches[-1]["replaced"]) == dm.replacement_samples
    return [k for b in batches for k in b["key"]], [int(b["skipped"]) for b in batches], dm.skipped_samples


@pytest.mark.parametrize("cache", [True, False])
def test_undecodable_sample_is_skipped_warned_and_counted(digits_root: Path, tmp_path: Path, cache: bool) -> None:
    root = _copy(digits_root, tmp_path / "d")
    bad = next(iter_shard(str(root / "train-000000.tar")))["__key__"]
    _corrupt_one_sample(root, bad)
    with pytest.warns(BadSampleWarning, match=rf"sample {bad} in shard .*train-000000\.tar"):
        keys, skipped, total = _run(root, cache=cache)
    assert bad not in keys and len(set(keys)) == 1346 and len(keys) == 1347  # one good sample stood in
    assert max(Counter(keys).values()) == 2
    assert skipped[-1] == total == 1 and skipped == sorted(skipped)  # a running total


@pytest.mark.parametrize("cut", [0.5, 0.75])
def test_truncated_shard_is_skipped_from_the_cut(digits_root: Path, tmp_path: Path, cut: float) -> None:
    root = _copy(digits_root, tmp_path / "d")
    shard = root / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * cut) + 700])  # as if a copy crashed
    readable = []
    try:
        for s in iter_shard(str(shard)):
            readable.append(s["__key__"])
    except Exception:
        pass  # tarfile raises when the cut is inside a member's data, and stops quietly inside a header
    assert 0 < len(readable) < 500
    warning = r"shard .*train-000001\.tar ended after key digits-\d+"
    with pytest.warns(BadSampleWarning, match=warning):
        keys, skipped, total = _run(root)
    # Every readable sample arrives; other good samples stand in for the lost ones, none more than twice.
    lost = 500 - len(readable)
    assert len(set(keys)) == 1347 - lost and set(readable) <= set(keys) and len(keys) == 1347
    assert max(Counter(keys).values()) == 2 and sum(n == 2 for n in Counter(keys).values()) == lost
    assert total == skipped[-1] == lost


def test_workers_report_skips_and_raise_policy_fails_without_hanging(digits_root: Path, tmp_path: Path) -> None:
    root = _copy(digits_root, tmp_path / "d")
    bad = next(iter_shard(str(root / "train-000000.tar")))["__key__"]
    _corrupt_one_sample(root, bad)
    keys, skipped, total = _run(root, workers=2, cache=False)  # the warning is printed by the worker process
    assert len(set(keys)) == 1346 and bad not in keys and total == 1
    with pytest.raises(DataError, match=rf"{bad}.*on_bad_sample=raise"):
        _run(root, workers=2, policy="raise", cache=False)
    with pytest.raises(DataError, match=bad):
        _run(root, workers=0, policy="raise")


def test_missing_shard_fails_before_training_naming_it(digits_root: Path, tmp_path: Path) -> None:
    root = _copy(digits_root, tmp_path / "d")
    (root / "train-000002.tar").unlink()
    dm = build_datamodule(DataConfig(root=str(root), prepare=False))
    with pytest.raises(DataError, match=r"shard .*train-000002\.tar does not exist"):
        dm.setup("fit")
    dm.setup("test")  # other splits are fine
    with pytest.raises(DataError, match=r"missing-\{0\.\.1\}|missing-000000\.tar"):
        build_datamodule(
            DataConfig(root=str(root), train=str(root / "missing-{000000..000001}.tar"), prepare=False)
        ).setup("fit")


def test_missing_manifest_names_the_fix(tmp_path: Path) -> None:
    dm = build_datamodule(DataConfig(dataset="mine", root=str(tmp_path / "nothing"), prepare=True))
    with pytest.raises(DataError, match=r"no manifest\.json in .*nothing.*scalegen data pack"):
        dm.spec  # noqa: B018


def test_manifest_format_is_checked(digits_root: Path, tmp_path: Path) -> None:
    root = _copy(digits_root, tmp_path / "d")
    m = json.loads((root / "manifest.json").read_text())
    m["format"] = "something-else"
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="format"):
        build_datamodule(DataConfig(root=str(root), prepare=False)).spec  # noqa: B018
