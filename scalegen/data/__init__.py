"""Sharded data: preparing WebDataset shards and loading them on one CPU or many GPU nodes.

- `prepare_dataset(name, out, source=None, shard_size=None)`: a built-in dataset (digits, mnist,
  cifar10, fsdd) as `{split}-{index:06d}.tar` shards plus `manifest.json`.
- `pack_folder(src, out)`: the user's own folder of images or audio, the same way.
- `build_datamodule(cfg.data) -> ShardDataModule`: the Lightning DataModule every recipe reads through;
  `.spec` is the `DataSpec` a family is built with.
"""

import scalegen.data.datasets  # noqa: F401  (registers the built-in preparers: PREPARERS is filled here)
from scalegen.data.datamodule import ShardDataModule, ShardLoader, build_datamodule
from scalegen.data.manifest import DataError, Manifest
from scalegen.data.pipeline import BadSampleWarning
from scalegen.data.prepare import prepare_dataset
from scalegen.data.shards import read_manifest

__all__ = [
    "BadSampleWarning",
    "DataError",
    "Manifest",
    "ShardDataModule",
    "ShardLoader",
    "build_datamodule",
    "prepare_dataset",
    "read_manifest",
]
