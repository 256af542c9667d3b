"""`manifest.json`: what a folder of shards holds, and how to check it.

The manifest is the single source of truth for loading: the per-shard sample counts let the loader
assign exact, equal slices of an epoch to every rank and worker before reading a byte, and the
sha256 of every shard lets preparation skip shards that are already written and intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scalegen.errors import UserError
from scalegen.fetch import sha256_file  # noqa: F401  (re-exported: callers import it from here)

FORMAT = "scalegen-shards/1"
MANIFEST = "manifest.json"


class DataError(UserError):
    """Shards or a manifest that cannot be used as they are; the message names the path and the fix."""


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest's folder, e.g. train-000003.tar
    count: int  # samples in the shard
    sha256: str = ""  # of the whole .tar file
    bytes: int = 0


@dataclass
class SplitInfo:
    count: int = 0
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class Manifest:
    name: str  # dataset name (digits, mnist, ... or the packed folder's name)
    kind: str  # image | audio
    shape: list[int]  # one stored example: [C, H, W] for images ([C, 0, 0] when sizes vary), [1, 0] audio
    class_names: list[str] = field(default_factory=list)  # index = label; [] when unlabelled
    sample_rate: int | None = None  # audio only: every WAV has this rate
    levels: int = 256  # quantization levels of the stored values (uint8 PNG: 256, 16-bit WAV: 65536)
    fields: dict[str, str] = field(default_factory=dict)  # tar member extension -> meaning
    extra_classes: dict[str, list[str]] = field(default_factory=dict)  # names of other int fields (speaker)
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # where it came from and its checksums
    notes: str = ""  # how the splits were made (documented per dataset)
    format: str = FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        splits = {
            k: SplitInfo(count=int(v["count"]), shards=[ShardInfo(**s) for s in v["shards"]])
            for k, v in d.pop("splits", {}).items()
        }
        known = {f for f in cls.__dataclass_fields__}
        return cls(splits=splits, **{k: v for k, v in d.items() if k in known})

    def save(self, folder: str | Path) -> None:
        atomic_write_bytes(Path(folder) / MANIFEST, self.to_json().encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
