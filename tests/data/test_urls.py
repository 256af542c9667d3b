"""Shard URLs: local paths, brace patterns, `pipe:` commands and fsspec `file://` URLs read the same samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalegen.config.schema import DataConfig
from scalegen.data import build_datamodule
from scalegen.data.shards import expand_urls, shard_name


def _keys(root: Path, train: str, world: int = 1) -> list[str]:
    dm = build_datamodule(DataConfig(root=str(root), train=train, batch_size=100, prepare=False))
    urls, counts = dm._shards("train")
    out = []
    for rank in range(world):
        loader = dm.train_dataloader()
        loader.stream.rank, loader.stream.world = rank, world
        out += [k for b in loader for k in b["key"]]
    return out


def test_expand_and_name() -> None:
    assert expand_urls("s3://b/train-{000000..000002}.tar") == [f"s3://b/train-00000{i}.tar" for i in range(3)]
    assert expand_urls("a.tar::b-{1..2}.tar") == ["a.tar", "b-1.tar", "b-2.tar"]
    assert shard_name("pipe:cat /data/train-000001.tar") == "train-000001.tar"
    assert shard_name("gs://bucket/d/train-000004.tar") == "train-000004.tar"


@pytest.mark.parametrize("world", [1, 2])
def test_local_brace_pipe_and_file_urls_agree(digits_root: Path, world: int) -> None:
    pattern = "train-{000000..000002}.tar"
    reference = _keys(digits_root, "", world)
    assert len(reference) == 1347
    for spec in (str(digits_root / pattern), f"pipe:cat {digits_root}/{pattern}", f"file://{digits_root}/{pattern}"):
        assert _keys(digits_root, spec, world) == reference, spec
