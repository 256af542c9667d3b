"""The digits preparer and the basic loading path: manifest, spec, decoding, split fallbacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from scalegen.config.schema import DataConfig
from scalegen.data import build_datamodule, read_manifest
from scalegen.data.manifest import sha256_file


def test_manifest_counts_and_checksums(digits_root: Path) -> None:
    m = read_manifest(str(digits_root))
    assert (m.name, m.kind, m.shape) == ("digits", "image", [1, 8, 8])
    assert m.class_names == [str(i) for i in range(10)]
    assert {k: v.count for k, v in m.splits.items()} == {"train": 1347, "val": 150, "test": 300}
    assert [s.count for s in m.splits["train"].shards] == [500, 500, 347]
    for split in m.splits.values():
        for shard in split.shards:
            assert shard.name.startswith(next(k for k, v in m.splits.items() if v is split) + "-")
            assert sha256_file(digits_root / shard.name) == shard.sha256
    assert json.loads((digits_root / "manifest.json").read_text())["source"]["sha256"]


def test_decoded_pixels_equal_the_source(digits_root: Path) -> None:
    """Every image decodes to round(v * 255 / 16) of sklearn's array, with its label; splits are disjoint."""
    data = load_digits()
    expected = np.round(data.images * 255 / 16).astype(np.uint8)
    dm = build_datamodule(DataConfig(root=str(digits_root), batch_size=50, prepare=False))
    seen: dict[str, set[int]] = {}
    for split, loader in [
        ("train", dm.train_dataloader()),
        ("val", dm.val_dataloader()),
        ("test", dm.test_dataloader()),
    ]:
        seen[split] = set()
        for batch in loader:
            assert batch["x"].dtype == torch.uint8 and batch["x"].shape[1:] == (1, 8, 8)
            for key, x, y in zip(batch["key"], batch["x"], batch["y"]):
                i = int(key.split("-")[1])
                assert np.array_equal(x[0].numpy(), expected[i]) and int(y) == data.target[i]
                seen[split].add(i)
    assert [len(s) for s in seen.values()] == [1347, 150, 300]
    assert set.union(*seen.values()) == set(range(1797)) and sum(map(len, seen.values())) == 1797


def test_spec_and_prepare_on_first_use(tmp_path: Path) -> None:
    dm = build_datamodule(DataConfig(root=str(tmp_path / "nested" / "digits"), batch_size=8))
    spec = dm.spec  # prepares: no manifest there yet
    assert (tmp_path / "nested" / "digits" / "manifest.json").is_file()
    assert (spec.kind, spec.shape, spec.num_classes, spec.levels) == ("image", (1, 8, 8), 10, 256)
    root = str(tmp_path / "nested" / "digits")
    resized = build_datamodule(DataConfig(root=root, resize=16, center_crop=12))
    assert resized.spec.shape == (1, 12, 12)
    assert next(iter(resized.val_dataloader()))["x"].shape[1:] == (1, 12, 12)


def test_root_with_tilde_is_expanded(digits_root: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(digits_root.parent))
    dm = build_datamodule(DataConfig(root=f"~/{digits_root.name}", prepare=False))
    assert dm.manifest.splits["test"].count == 300


def test_val_falls_back_to_test(digits_root: Path, tmp_path: Path) -> None:
    manifest = json.loads((digits_root / "manifest.json").read_text())
    del manifest["splits"]["val"]
    for shard in manifest["splits"]["test"]["shards"]:
        (tmp_path / shard["name"]).symlink_to(digits_root / shard["name"])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    dm = build_datamodule(DataConfig(root=str(tmp_path), batch_size=100, prepare=False))
    keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert len(keys) == 300 and keys == [k for b in dm.test_dataloader() for k in b["key"]]
