"""The loading pipeline: an IterableDataset that turns one rank's share of an epoch into batch dicts.

Each DataLoader worker runs the stages below on its own plan (see `scalegen.data.split`), and the
DataLoader is used with `batch_size=None`: batching happens here, so the batch sizes are the planned
ones and the position in the epoch is simply "how many batches this rank has received".

Batches: `x` (uint8 [B, C, H, W] images, float32 [B, 1, T] audio, or int64 [B, 1, T] mu-law codes),
`y` (int64 [B], -1 when unlabelled), `key` (list of str), numeric fields from the sample's json
(e.g. `speaker` for FSDD) as tensors, and `skipped` (an int: bad samples this worker skipped since its
previous batch; `ShardLoader` turns it into the rank's running total, an int64 scalar tensor; a plain int
here is one tensor fewer for a worker to send through shared memory).
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from scalegen.data import transforms as T
from scalegen.data.decode import decode_png_batch, decode_sample
from scalegen.data.manifest import DataError
from scalegen.data.prefetch import warn
from scalegen.data.shards import iter_shard_chunks
from scalegen.data.split import Slice, batches_before, plan_worker, worker_batch_range

Raw = dict[str, Any]


class BadSampleWarning(UserWarning):
    """A shard or sample was skipped because it could not be read or decoded."""


@dataclass
class StreamOptions:
    kind: str  # image | audio (from the manifest)
    channels: int | None  # image channels to decode to (from the manifest)
    sample_rate: int | None  # audio: every WAV must have this rate
    batch_size: int
    train: bool  # shuffle and random transforms (else deterministic order and transforms)
    shuffle_buffer: int = 0
    resampled: bool = False
    seed: int = 0
    on_bad_sample: str = "warn"
    random_flip: bool = False
    random_crop_padding: int = 0
    resize: int | None = None
    center_crop: int | None = None
    clip_samples: int = 0  # audio: fixed length (0 = keep; then every clip must have the same length)
    mu_law: int = 0


class _Skips:
    """Bad samples seen by this worker, and how many were already reported in a batch."""

    def __init__(self, policy: str) -> None:
        self.policy, self.total, self.reported = policy, 0, 0

    def bad(self, message: str, n: int = 1) -> None:
        if self.policy == "raise":
            raise DataError(f"{message} (data.on_bad_sample=raise; set it to warn to skip bad data)")
        warn(f"skipping {n} sample(s): {message}", BadSampleWarning)  # deferred to the consumer in a prefetch thread
        self.total += n

    def delta(self) -> int:
        d, self.reported = self.total - self.reported, self.total
        return d


class ShardStream(IterableDataset):
    """One split's shards for one rank; `epoch` and `start` (batches already consumed) are set per pass."""

    def __init__(
        self, urls: Sequence[str], counts: Sequence[int], opts: StreamOptions, rank: int = 0, world: int = 1
    ) -> None:
        super().__init__()
        if len(urls) != len(counts):
            raise ValueError("one count per shard URL")
        self.urls, self.counts, self.opts = list(urls), list(counts), opts
        self.rank, self.world = rank, world
        self._position: Any = [0, 0]  # (epoch, start); shared memory once `share_position` is called

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._position[0] = value

    @property
    def start(self) -> int:
        return int(self._position[1])

    @start.setter
    def start(self, value: int) -> None:
        self._position[1] = value

    def share_position(self, context: Any) -> None:
        """Keep (epoch, start) in shared memory, so that persistent DataLoader workers (which hold a copy
        of this object made when they started) read the pass the main process sets before each epoch."""
        shared = context.RawArray("q", 2)
        shared[0], shared[1] = self._position[0], self._position[1]
        self._position = shared

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers round-robin starting with worker 0, and batch g
        # of a pass belongs to planned worker g % W; a pass resumed at batch `start` must therefore
        # start with planned worker start % W: rotate which plan each DataLoader worker runs.
        worker = (worker + self.start) % num_workers
        o = self.opts
        skips = _Skips(o.on_bad_sample)
        if o.resampled:
            # An infinite stream is not replayed on resume (that would re-read everything seen so
            # far): a resumed stream draws afresh, seeded by its position, so it is still reproducible.
            slices: Iterable[Slice] = self._resampled_slices(worker)
            sizes: Iterable[int] = _forever(o.batch_size)
            first_batch, to_drop = 0, 0
        else:
            plan = plan_worker(
                self.counts,
                rank=self.rank,
                world=self.world,
                worker=worker,
                num_workers=num_workers,
                batch_size=o.batch_size,
                epoch=self.epoch,
                seed=o.seed,
                shuffle=o.train,
            )
            slices, sizes = plan.slices, plan.batch_sizes
            first_batch = worker_batch_range(len(self), worker, num_workers)[0]
            to_drop = batches_before(self.start, worker, num_workers)  # resume: replay, drop undecoded
        # Planned batches are numbered per rank already; resampled ones per worker (and resume point).
        aug_seed = (o.seed, self.epoch, self.rank) + ((worker, self.start) if o.resampled else (-1,))
        rng = random.Random(f"shuffle/{o.seed}/{self.epoch}/{self.rank}/{worker}/{self.start if o.resampled else 0}")
        stages: list[Callable[[Any], Iterable[Any]]] = [
            partial(read_slices, self.urls, skips=skips),  # raw samples (bytes), bad shards skipped
            partial(shuffle, buffer=o.shuffle_buffer if o.train else 0, rng=rng),
            partial(group, sizes=sizes, first=first_batch),  # (batch index, [raw]) in planned sizes
            partial(drop, n=to_drop),  # resume mid-epoch: batches already consumed, dropped undecoded
            partial(
                decode_batches,
                decode_one=self.decode_one,
                decode_batch=self._decode_batch,
                skips=skips,
                seed=aug_seed,
            ),
            partial(collate, skips=skips),
        ]
        stream: Any = slices
        for stage in stages:
            stream = stage(stream)
        return iter(stream)

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        if self.opts.resampled:
            raise TypeError("a resampled stream has no length")
        from scalegen.data.split import steps_per_epoch

        return steps_per_epoch(sum(self.counts), self.world, self.opts.batch_size)

    def _resampled_slices(self, worker: int) -> Iterator[Slice]:
        """Whole shards drawn with replacement, weighted by size (each sample equally likely)."""
        rng = random.Random(f"resampled/{self.opts.seed}/{self.epoch}/{self.rank}/{worker}/{self.start}")
        population = range(len(self.counts))
        while True:
            shard = rng.choices(population, weights=self.counts)[0]
            yield Slice(shard, 0, self.counts[shard])

    def _decode_batch(self, raws: list[Raw], gen: torch.Generator) -> dict[str, Any] | None:
        """The whole batch at once when it is all plain same-size PNGs with labels and nothing else
        (built-in image datasets); None otherwise, and the samples are decoded one by one."""
        o = self.opts
        if o.kind != "image" or not raws or any(map(operator.contains, raws, repeat("json"))):
            return None
        try:  # one pass over the samples (they lie scattered in memory after the shuffle)
            keys, pngs, labels = zip(*map(_KEY_PNG_CLS, raws))
        except KeyError:  # a sample without a label (or without a PNG)
            if None in (pngs := [r.get("png") for r in raws]):
                return None
            keys, labels = [r["__key__"] for r in raws], [r.get("cls") for r in raws]
        arr = decode_png_batch(pngs, o.channels)
        if arr is None:
            return None
        y = _labels(labels)
        if y is None:
            return None
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
        if o.resize or o.center_crop or (o.train and (o.random_crop_padding > 0 or o.random_flip)):
            x = torch.stack([self._transform_image(xi, gen) for xi in x])
        return {"x": x, "y": y, "key": list(keys)}

    def _transform_image(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        o = self.opts
        if o.resize:
            x = T.resize(x, o.resize)
        if o.center_crop:
            x = T.center_crop(x, o.center_crop)
        if o.train and o.random_crop_padding > 0:
            x = T.random_crop(x, tuple(x.shape[-2:]), o.random_crop_padding, gen)
        if o.train and o.random_flip:
            x = T.random_flip(x, gen)
        return x

    def decode_one(self, raw: Raw, gen: torch.Generator) -> dict[str, Any]:
        o = self.opts
        s = decode_sample(raw, o.kind, o.channels, o.sample_rate)
        x = s["x"]
        if o.kind == "image":
            x = self._transform_image(x, gen)
        else:
            if o.clip_samples:
                x = T.crop_or_pad(x, o.clip_samples, gen if o.train else None)
            if o.mu_law:
                x = T.mu_law_encode(x, o.mu_law)
        s["x"] = x
        return s


_KEY_PNG_CLS = operator.itemgetter("__key__", "png", "cls")


def _labels(fields: Sequence[bytes | None]) -> torch.Tensor | None:
    """int64 labels from the `cls` members (-1 where missing); None when one is not an integer."""
    try:
        if None in fields:
            return torch.tensor([-1 if f is None else int(f) for f in fields], dtype=torch.int64)
        words = b" ".join(fields).split()  # one numpy parse for the batch instead of an int() per label
        return torch.from_numpy(np.array(words, dtype=np.int64)) if len(words) == len(fields) else None
    except ValueError:
        return None


# ---- stages ----------------------------------------------------------------------------------------
# Stages up to `group` pass lists of raw samples (one generator step per list, not per sample).
def read_slices(urls: Sequence[str], slices: Iterable[Slice], skips: _Skips) -> Iterator[list[Raw]]:
    """The samples of each slice; a shard that is missing, truncated or corrupt is skipped (and counted)."""
    for sl in slices:
        url, got, last_key = urls[sl.shard], 0, None
        want = sl.stop - sl.start
        try:
            seen = 0  # samples of the shard read so far
            for chunk in iter_shard_chunks(url):
                part = chunk[max(sl.start - seen, 0) : sl.stop - seen]
                seen += len(chunk)
                if part:
                    for sample in part:
                        sample["__url__"] = url
                    got, last_key = got + len(part), part[-1]["__key__"]
                    yield part
                if seen >= sl.stop:
                    break
        except Exception as err:  # tarfile, gzip, OS and pipe errors all mean "this shard is bad here"
            where = f"after key {last_key}" if last_key else f"at sample {sl.start}"
            skips.bad(f"shard {url} unreadable {where}: {type(err).__name__}: {err}", want - got)
            continue
        if got < want:
            skips.bad(f"shard {url} ended after key {last_key}: {got} of {want} planned samples", want - got)


def shuffle(chunks: Iterable[list[Raw]], buffer: int, rng: random.Random) -> Iterator[list[Raw]]:
    """A shuffle buffer: a permutation of the stream (nothing dropped or repeated); buffer <= 1 is a no-op.
    Each sample arriving in a full buffer swaps with a uniformly drawn held one, which leaves. The slots
    are drawn a chunk at a time (numpy, seeded from `rng`): the per-sample work is one swap."""
    if buffer <= 1:
        yield from chunks
        return
    draws = np.random.default_rng(rng.getrandbits(64))
    held: list[Raw] = []
    for chunk in chunks:
        room = buffer - len(held)
        if room > 0:
            held.extend(chunk[:room])
            chunk = chunk[room:]
            if not chunk:
                continue
        out = []
        for item, i in zip(chunk, draws.integers(0, buffer, len(chunk)).tolist()):
            out.append(held[i])
            held[i] = item
        yield out
    rng.shuffle(held)
    yield held


def group(chunks: Iterable[list[Raw]], sizes: Iterable[int], first: int) -> Iterator[tuple[int, list[Raw]]]:
    """Exactly one group per planned size, numbered from `first`; short (even empty) if the stream ran dry."""
    it = iter(chunks)
    pending: list[Raw] = []
    for j, size in enumerate(sizes):
        while len(pending) < size:
            more = next(it, None)
            if more is None:
                break
            pending.extend(more)
        yield first + j, pending[:size]
        del pending[:size]


def drop(stream: Iterable[Any], n: int) -> Iterator[Any]:
    for i, item in enumerate(stream):
        if i >= n:
            yield item


def decode_batches(
    stream: Iterable[tuple[int, list[Raw]]],
    decode_one: Callable[[Raw, torch.Generator], Any],
    skips: _Skips,
    seed: tuple[int, ...],
    decode_batch: Callable[[list[Raw], torch.Generator], dict[str, Any] | None] | None = None,
) -> Iterator[list[dict[str, Any]] | dict[str, Any]]:
    """Decode and transform each sample; undecodable ones are skipped (and counted).

    Random transforms draw from a generator seeded by (seed, epoch, rank, batch index), so a batch's
    augmentation does not depend on what was read before it (resume gives identical batches).
    A batch left empty (its samples were all bad, or the rank had fewer samples than steps) repeats
    the previous batch's samples, so every rank still takes the same number of steps.
    `decode_batch`, when given, may decode a whole batch at once (a ready batch dict) or decline (None).
    """
    recent: list[dict[str, Any]] | dict[str, Any] = []
    for index, raws in stream:
        gen = torch.Generator().manual_seed(hash_seed(*seed, index))
        fast = decode_batch(raws, gen) if decode_batch is not None else None
        if fast is not None:
            recent = fast
            yield fast
            continue
        gen = torch.Generator().manual_seed(hash_seed(*seed, index))  # the same draws as the fast path
        out: list[dict[str, Any]] = []
        for raw in raws:
            try:
                out.append(decode_one(raw, gen))
            except DataError:
                raise
            except Exception as err:
                where = f"sample {raw.get('__key__')} in shard {raw.get('__url__')}"
                skips.bad(f"{where}: {type(err).__name__}: {err}")
        if not out:
            if not recent:
                continue  # nothing good read yet: nothing to repeat
            yield recent
            continue
        recent = out
        yield out


def collate(stream: Iterable[list[dict[str, Any]] | dict[str, Any]], skips: _Skips) -> Iterator[dict[str, Any]]:
    for samples in stream:
        if isinstance(samples, dict):  # decoded as a whole batch already
            yield {**samples, "skipped": skips.delta()}
            continue
        shapes = {tuple(s["x"].shape) for s in samples}
        if len(shapes) > 1:
            raise DataError(
                f"examples of different shapes {sorted(shapes)} in a batch (first key {samples[0]['key']}): "
                "set data.resize and data.center_crop (images) or data.clip_samples (audio)"
            )
        batch: dict[str, Any] = {
            "x": torch.stack([s["x"] for s in samples]),
            "y": torch.tensor([s["y"] for s in samples], dtype=torch.int64),
            "key": [s["key"] for s in samples],
        }
        for k in samples[0]:
            if k in batch or not all(k in s for s in samples):
                continue
            values = [s[k] for s in samples]
            if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                batch[k] = torch.tensor(values, dtype=torch.int64)
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                batch[k] = torch.tensor(values, dtype=torch.float32)
            else:
                batch[k] = values
        batch["skipped"] = skips.delta()
        yield batch


def _forever(n: int) -> Iterator[int]:
    while True:
        yield n


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes (unlike hash())."""
    import hashlib

    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
