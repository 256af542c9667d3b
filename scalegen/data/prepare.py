"""Preparing built-in datasets as shards: `prepare_dataset(name, out, source=None, shard_size=None)`.

Each preparer reads the upstream format (downloaded with checksum verification, or a local copy given
as `source`), fixes the splits, and returns the items per split plus how to encode one item as a tar
sample. `prepare_dataset` then writes the shards atomically and the manifest last; a re-run keeps
every shard that is already there and matches the recorded sha256.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalegen.data.manifest import MANIFEST, DataError, Manifest, ShardInfo, atomic_write_bytes, sha256_file
from scalegen.data.shards import Sample, write_split
from scalegen.errors import did_you_mean

PROGRESS = ".progress.json"  # shards finished so far by an interrupted preparation


@dataclass
class Prepared:
    """What a preparer hands to the shard writer."""

    kind: str
    shape: list[int]
    class_names: list[str]
    splits: dict[str, Sequence[Any]]  # split -> items, in the order they are written
    encode: Callable[[str, int, Any], Sample]  # (split, index in split, item) -> tar sample
    source: dict[str, Any]  # provenance and checksums, recorded in the manifest
    notes: str  # how the splits were made
    sample_rate: int | None = None
    levels: int = 256
    fields: dict[str, str] = field(default_factory=dict)
    extra_classes: dict[str, list[str]] = field(default_factory=dict)
    shard_size: int = 5000  # default samples per shard


PREPARERS: dict[str, Callable[[str | None], Prepared]] = {}


def preparer(name: str) -> Callable[[Callable[[str | None], Prepared]], Callable[[str | None], Prepared]]:
    def deco(fn: Callable[[str | None], Prepared]) -> Callable[[str | None], Prepared]:
        PREPARERS[name] = fn
        return fn

    return deco


def prepare_dataset(
    name: str,
    out: str | Path,
    source: str | None = None,
    shard_size: int | None = None,
    progress: bool = True,
) -> Manifest:
    """Write the built-in dataset `name` as shards + manifest.json into `out`; returns the manifest.

    Safe to call from several processes at once (a file lock serializes them) and to re-run after a
    crash (finished shards that verify are kept).
    """
    if name not in PREPARERS:
        raise DataError(
            f"no built-in dataset {name!r}.{did_you_mean(name, PREPARERS)} "
            "For your own files use `scalegen data pack SRC --out DIR`."
        )
    out = Path(os.path.expanduser(str(out)))
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out / ".prepare.lock"):  # ranks of one job may all get here first; one prepares
        return _write(name, PREPARERS[name](source), out, shard_size, progress)


def write_prepared(
    name: str, prep: Prepared, out: Path, shard_size: int | None = None, progress: bool = True
) -> Manifest:
    """Shards + manifest for prepared items (a built-in dataset or a packed folder); see `prepare_dataset`."""
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out / ".prepare.lock"):
        return _write(name, prep, out, shard_size, progress)


def _write(name: str, prep: Prepared, out: Path, shard_size: int | None, progress: bool) -> Manifest:
    size = int(shard_size or prep.shard_size)
    plan = {
        "dataset": name,
        "shard_size": size,
        "splits": {k: len(v) for k, v in prep.splits.items()},
        "source_sha256": prep.source.get("sha256"),
        "fields": sorted(prep.fields),  # another member layout (PNG -> npy) is another plan: re-prepared
    }
    previous = _previous_shards(out, plan)
    if previous is not None and _complete(out, plan, previous):
        return Manifest.from_dict(json.loads((out / MANIFEST).read_text()))
    manifest = Manifest(
        name=name,
        kind=prep.kind,
        shape=prep.shape,
        class_names=prep.class_names,
        sample_rate=prep.sample_rate,
        levels=prep.levels,
        fields={**prep.fields, "crc32": "CRC-32 of the sample's other members in extension order (hex)"},
        extra_classes=prep.extra_classes,
        source={**prep.source, "plan": plan},
        notes=prep.notes,
    )
    done: dict[str, ShardInfo] = {}
    total = sum(len(v) for v in prep.splits.values())
    with _progress_bar(f"preparing {name}", total, progress) as advance:

        def on_shard(info: ShardInfo, skipped: bool) -> None:
            done[info.name] = info
            atomic_write_bytes(
                out / PROGRESS,
                json.dumps({"plan": plan, "shards": [vars(s) for s in done.values()]}).encode(),
            )
            advance(info.count)

        for split, items in prep.splits.items():
            encode = lambda i, item, split=split: prep.encode(split, i, item)  # noqa: E731
            manifest.splits[split] = write_split(out, split, items, encode, size, previous, on_shard)
    manifest.save(out)
    (out / PROGRESS).unlink(missing_ok=True)
    # Shards of an earlier, different plan (e.g. another shard size) would confuse glob-style URLs.
    keep = {s.name for split in manifest.splits.values() for s in split.shards}
    for split in manifest.splits:
        for path in out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            if path.name not in keep:
                path.unlink()
    return manifest


def _previous_shards(out: Path, plan: dict[str, Any]) -> dict[str, ShardInfo] | None:
    """Shards recorded by an earlier run with the same plan (finished manifest or progress file)."""
    for name in (MANIFEST, PROGRESS):
        try:
            data = json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
        if name == MANIFEST:
            if data.get("source", {}).get("plan") == plan:
                return {s["name"]: ShardInfo(**s) for v in data["splits"].values() for s in v["shards"]}
        elif data.get("plan") == plan:
            return {s["name"]: ShardInfo(**s) for s in data["shards"]}
    return None


def _complete(out: Path, plan: dict[str, Any], previous: dict[str, ShardInfo]) -> bool:
    """The manifest exists for this plan and every shard in it is present with its recorded sha256."""
    if not (out / MANIFEST).is_file() or (out / PROGRESS).exists():
        return False
    expected = sum((n + plan["shard_size"] - 1) // plan["shard_size"] for n in plan["splits"].values())
    return len(previous) == expected and all(
        (out / s.name).is_file() and sha256_file(out / s.name) == s.sha256 for s in previous.values()
    )


@contextmanager
def _lock(path: Path):  # type: ignore[no-untyped-def]
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _progress_bar(description: str, total: int, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        yield lambda n: None
        return
    # rich only when a progress bar is shown (it is slow to import)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
