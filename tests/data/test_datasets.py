"""The built-in preparers against their upstream formats: FSDD and MNIST from ../shared/datasets, CIFAR-10
from a small archive written here in the upstream python-pickle format."""

from __future__ import annotations

import gzip
import pickle
import shutil
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from scalegen.config.schema import DataConfig
from scalegen.data import BadSampleWarning, DataError, build_datamodule, prepare_dataset, read_manifest
from scalegen.data.decode import encode_wav
from scalegen.data.shards import iter_shard, tar_bytes


# ---- FSDD ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fsdd_root(shared_datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fsdd")
    prepare_dataset("fsdd", root, source=str(shared_datasets / "fsdd"), progress=False)
    return root


def test_fsdd_official_split_speakers_and_rate(fsdd_root: Path) -> None:
    m = read_manifest(str(fsdd_root))
    assert (m.kind, m.sample_rate, m.levels) == ("audio", 8000, 65536)
    assert {k: v.count for k, v in m.splits.items()} == {"train": 2700, "test": 300}
    assert m.extra_classes["speaker"] == ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    dm = build_datamodule(DataConfig(root=str(fsdd_root), batch_size=50, clip_samples=4000, prepare=False))
    assert (dm.spec.kind, dm.spec.shape, dm.spec.sample_rate, dm.spec.levels) == ("audio", (1, 4000), 8000, 65536)
    keys = []
    for batch in dm.test_dataloader():
        assert batch["x"].dtype == torch.float32 and batch["x"].shape[1:] == (1, 4000)
        for key, y, spk in zip(batch["key"], batch["y"], batch["speaker"]):
            digit, speaker, take = key.split("_")
            assert int(take) <= 4 and int(y) == int(digit) and m.extra_classes["speaker"][int(spk)] == speaker
        keys += batch["key"]
    assert len(set(keys)) == 300


def test_fsdd_samples_equal_the_wav_files(fsdd_root: Path, shared_datasets: Path) -> None:
    """Eval clips: the first 4000 samples / 32768, zero-padded; mu-law codes when asked."""
    dm = build_datamodule(DataConfig(root=str(fsdd_root), batch_size=20, clip_samples=4000, prepare=False))
    batch = next(iter(dm.test_dataloader()))
    mu = build_datamodule(DataConfig(root=str(fsdd_root), batch_size=20, clip_samples=4000, mu_law=256,
                                     prepare=False))
    codes = next(iter(mu.test_dataloader()))
    assert mu.spec.levels == 256 and codes["x"].dtype == torch.int64 and 0 <= codes["x"].min() <= codes["x"].max() < 256
    for key, x in zip(batch["key"], batch["x"]):
        with wave.open(str(shared_datasets / "fsdd" / "recordings" / f"{key}.wav")) as w:
            ref = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
        ref = np.pad(ref, (0, max(0, 4000 - len(ref))))[:4000]
        assert np.array_equal(x[0].numpy(), ref)
    i = batch["key"].index(codes["key"][0])
    v = batch["x"][i, 0].double()
    f = torch.sign(v) * torch.log1p(255 * v.abs()) / np.log1p(255)
    assert (codes["x"][0, 0] - ((f + 1) / 2 * 255).round().long()).abs().max() <= 1


def test_wrong_sample_rate_is_a_bad_sample(fsdd_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "f"
    shutil.copytree(fsdd_root, root, ignore=shutil.ignore_patterns(".*"))
    samples = list(iter_shard(str(root / "test-000000.tar")))
    samples[3]["wav"] = encode_wav(np.zeros(100, np.int16), 16000)
    (root / "test-000000.tar").write_bytes(tar_bytes(samples))
    dm = build_datamodule(DataConfig(root=str(root), batch_size=100, clip_samples=800, prepare=False))
    with pytest.warns(BadSampleWarning, match=rf"{samples[3]['__key__']}.*16000 Hz, expected 8000 Hz"):
        keys = [k for b in dm.test_dataloader() for k in b["key"]]
    assert len(keys) == 299 and dm.skipped_samples == 1


# ---- CIFAR-10 --------------------------------------------------------------------------------------------
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _fake_cifar(folder: Path, per_batch: int = 40) -> dict[str, np.ndarray]:
    """cifar-10-batches-py/ exactly as upstream lays it out (Python-2 pickles: bytes keys), random images."""
    rng = np.random.default_rng(0)
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        arrays[name] = data
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return arrays


@pytest.mark.parametrize("as_archive", [False, True])
def test_cifar10_from_upstream_format(tmp_path: Path, as_archive: bool) -> None:
    arrays = _fake_cifar(tmp_path / "src")
    source = tmp_path / "src"
    if as_archive:
        source = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(source, "w:gz") as tar:
            tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    m = prepare_dataset("cifar10", tmp_path / "out", source=str(source), shard_size=64, progress=False)
    assert m.class_names == CLASSES and m.shape == [3, 32, 32]
    assert {k: (v.count, [s.count for s in v.shards]) for k, v in m.splits.items()} == {
        "train": (200, [64, 64, 64, 8]), "test": (40, [40])}
    dm = build_datamodule(DataConfig(dataset="cifar10", root=str(tmp_path / "out"), batch_size=16, prepare=False))
    assert dm.spec.shape == (3, 32, 32) and dm.split_name("val") == "test"
    n = 0
    for batch in dm.train_dataloader():
        for key, x in zip(batch["key"], batch["x"]):
            _, name, row = key.split("-")
            assert torch.equal(x, torch.from_numpy(arrays[name][int(row)].reshape(3, 32, 32)))  # CHW planes
            n += 1
    assert n == 200


def test_cifar10_missing_batch_is_named(tmp_path: Path) -> None:
    _fake_cifar(tmp_path / "src", per_batch=2)
    (tmp_path / "src" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        prepare_dataset("cifar10", tmp_path / "out", source=str(tmp_path / "src"), progress=False)


# ---- MNIST -----------------------------------------------------------------------------------------------
def test_mnist_checksum_of_decompressed_files_is_enforced(shared_datasets: Path, tmp_path: Path) -> None:
    src = tmp_path / "mnist"
    src.mkdir()
    for f in (shared_datasets / "mnist").glob("*.gz"):
        (src / f.name).symlink_to(f)
    (src / "t10k-labels-idx1-ubyte.gz").unlink()
    labels = gzip.decompress((shared_datasets / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels[:-1] + b"\x00"))  # one label changed
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*decompressed sha256"):
        prepare_dataset("mnist", tmp_path / "out", source=str(src), progress=False)


@pytest.mark.slow
def test_mnist_prepared_from_the_shared_copy(shared_datasets: Path, tmp_path: Path) -> None:
    m = prepare_dataset("mnist", tmp_path, source=str(shared_datasets / "mnist"), progress=False)
    assert {k: v.count for k, v in m.splits.items()} == {"train": 55000, "val": 5000, "test": 10000}
    dm = build_datamodule(DataConfig(dataset="mnist", root=str(tmp_path), batch_size=10, prepare=False))
    first = next(iter(dm.test_dataloader()))
    assert first["y"].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # upstream t10k's first labels
    with gzip.open(shared_datasets / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        ref = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:10]
    assert np.array_equal(first["x"][:, 0].numpy(), ref)
    total = sum(float(b["x"].float().sum()) for b in dm.train_dataloader())
    assert abs(total / (55000 * 784) / 255 - 0.1307) < 0.002  # the usual MNIST mean

