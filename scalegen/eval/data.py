"""The evaluation data: whole splits held in memory as tensors, the same on every rank.

The runner needs random access (to split examples across ranks exactly and to draw labelled
subsets), so a split is read once, in its stored deterministic order, through the data pipeline's
shard reader with no rank splitting, then indexed. `EvalData.from_arrays` wraps tensors directly
(tests, notebooks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from scalegen.data import build_datamodule
from scalegen.data.pipeline import ShardStream, StreamOptions
from scalegen.dataspec import DataSpec

Loader = Callable[[str, "int | None"], "tuple[Tensor, Tensor]"]


def tensor_checksum(*tensors: Tensor) -> str:
    """sha256 over the bytes of the tensors (what the metrics actually saw)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class EvalData:
    """Named splits of one dataset, loaded on demand and cached; `x` as stored (uint8 images), `y` int64."""

    name: str  # dataset name, used in cache keys and labels
    spec: DataSpec
    loader: Loader  # (split, limit) -> (x, y): the first `limit` examples of the split in stored order
    shards_checksum: dict[str, str] = field(default_factory=dict)  # split -> sha256 over its shards' sha256
    _cache: dict = field(default_factory=dict, repr=False)

    def split(self, name: str, limit: int | None = None) -> tuple[Tensor, Tensor]:
        key = (name, limit)
        if key not in self._cache:
            self._cache[key] = self.loader(name, limit)
        return self._cache[key]

    def checksum(self, name: str, limit: int | None = None) -> str:
        return tensor_checksum(*self.split(name, limit))

    @classmethod
    def from_arrays(cls, name: str, spec: DataSpec, splits: dict[str, tuple[Tensor, Tensor]]) -> EvalData:
        def load(split: str, limit: int | None) -> tuple[Tensor, Tensor]:
            if split not in splits:
                raise KeyError(f"no {split!r} split (have {sorted(splits)})")
            x, y = splits[split]
            return (x, y) if limit is None else (x[:limit], y[:limit])

        return cls(name, spec, load)

    @classmethod
    def from_config(cls, data_cfg) -> EvalData:
        """The recipe's data (shards + manifest) through the data pipeline, read without rank splitting."""

        dm = build_datamodule(data_cfg)
        m = dm.manifest

        def load(split: str, limit: int | None) -> tuple[Tensor, Tensor]:
            urls, counts = dm._shards(split)
            opts = StreamOptions(
                kind=m.kind,
                channels=m.shape[0] if m.kind == "image" else None,
                sample_rate=m.sample_rate,
                batch_size=max(1, min(512, limit or 512)),
                train=False,
                seed=0,
                on_bad_sample=data_cfg.on_bad_sample,
                resize=data_cfg.resize,
                center_crop=data_cfg.center_crop,
                clip_samples=data_cfg.clip_samples if m.kind == "audio" else 0,
                mu_law=data_cfg.mu_law if m.kind == "audio" else 0,
            )
            xs, ys, n = [], [], 0
            for batch in ShardStream(urls, counts, opts, rank=0, world=1):
                xs.append(batch["x"])
                ys.append(batch["y"])
                n += len(batch["x"])
                if limit is not None and n >= limit:
                    break
            x, y = torch.cat(xs), torch.cat(ys)
            return (x, y) if limit is None else (x[:limit], y[:limit])

        sums = {}
        for split, info in m.splits.items():
            sums[split] = hashlib.sha256("".join(s.sha256 for s in info.shards).encode()).hexdigest()
        return cls(m.name, dm.spec, load, shards_checksum=sums)
