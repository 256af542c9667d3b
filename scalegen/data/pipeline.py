"""The loading pipeline: one rank's share of an epoch as batch dicts, from memory or streamed from shards.

`DecodedSplit` (used when the rank's decoded share fits `data.cache_bytes`): the share is read and decoded
once, and every epoch is a seeded permutation of it, batched from memory. Otherwise `ShardStream`, an
IterableDataset, streams it: each DataLoader worker (or the training process) runs the stages below on its
own plan (see `scalegen.data.split`), with `batch_size=None` (batching happens here, so the batch sizes are
the planned ones and the position in the epoch is "how many batches this rank has received").

Batches: `x` (uint8 [B, C, H, W] images, float32 [B, 1, T] audio, or int64 [B, 1, T] mu-law codes),
`y` (int64 [B], -1 when unlabelled), `key` (list of str), numeric fields from the sample's json
(e.g. `speaker` for FSDD) as tensors, and `skipped` / `replaced` (ints: bad samples skipped, and samples
standing in for missing ones, since the previous batch; `ShardLoader` turns them into running totals).

Damage costs only itself: the tar reader reads on past a corrupt header, a bad sample is skipped, and a
batch short of its planned size is filled with other good samples of the same epoch (each used as a stand-in
at most once), so every rank takes the planned number of steps and no batch is repeated.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

import scalegen.data.transforms as T
from scalegen.data.decode import decode_sample
from scalegen.data.manifest import DataError
from scalegen.data.shards import iter_shard
from scalegen.data.split import (
    Slice,
    batches_before,
    plan_worker,
    positions,
    steps_per_epoch,
    worker_batch_range,
)

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
    checked: bool = False  # every sample has a crc32 member (the manifest lists it): one without is damaged


class _Skips:
    """Bad samples and stand-ins counted by one worker, and how many were already reported in a batch."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.skipped, self.replaced, self._reported = 0, 0, (0, 0)

    def damage(self, message: str) -> None:
        """Damage whose cost in samples is counted where the slice comes up short."""
        if self.policy == "raise":
            raise DataError(f"{message} (data.on_bad_sample=raise; set it to warn to skip bad data)")
        warnings.warn(message, BadSampleWarning, stacklevel=2)

    def bad(self, message: str, n: int = 1) -> None:
        self.damage(f"skipping {n} sample(s): {message}")
        self.skipped += n

    def deltas(self) -> dict[str, int]:
        (s, r), self._reported = self._reported, (self.skipped, self.replaced)
        return {"skipped": self.skipped - s, "replaced": self.replaced - r}


class ShardStream(IterableDataset):
    """One split's shards for one rank; `epoch`, `start` (batches already consumed) and `exclude` (sorted
    positions seen before this pass, in an epoch resumed at another world size) are set per pass."""

    def __init__(
        self, urls: Sequence[str], counts: Sequence[int], opts: StreamOptions, rank: int = 0, world: int = 1
    ) -> None:
        super().__init__()
        if len(urls) != len(counts):
            raise ValueError("one count per shard URL")
        self.urls, self.counts, self.opts = list(urls), list(counts), opts
        self.rank, self.world = rank, world
        self._position: Any = [0, 0]  # (epoch, start); shared memory once `share_position` is called
        self.exclude = np.zeros(0, dtype=np.int64)

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
                exclude=self.exclude,
            )
            slices, sizes = plan.slices, plan.batch_sizes
            first_batch = worker_batch_range(len(self), worker, num_workers)[0]
            to_drop = batches_before(self.start, worker, num_workers)  # resume: replay, drop undecoded
        # Planned batches are numbered per rank already; resampled ones per worker (and resume point).
        aug_seed = (o.seed, self.epoch, self.rank) + ((worker, self.start) if o.resampled else (-1,))
        tag = f"{o.seed}/{self.epoch}/{self.rank}/{worker}/{self.start if o.resampled else 0}"
        stages: list[Callable[[Any], Iterable[Any]]] = [
            partial(read_slices, self.urls, skips=skips),  # raw samples (bytes), damage skipped
            partial(shuffle, buffer=o.shuffle_buffer if o.train else 0, rng=random.Random(f"shuffle/{tag}")),
            partial(group, sizes=sizes, first=first_batch),  # (batch index, planned size, [raw])
            partial(drop, n=to_drop),  # resume mid-epoch: batches already consumed, dropped undecoded
            partial(decode_batches, decode_one=self.decode_one, skips=skips, seed=aug_seed,
                    spares=Spares(4 * o.batch_size, random.Random(f"spares/{tag}"))),
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

        return steps_per_epoch(sum(self.counts) - len(self.exclude), self.world, self.opts.batch_size)

    def taken(self, batches: int, num_workers: int, cached: bool) -> list[int]:
        """The positions of the samples in the first `batches` batches this rank receives in the pass
        (`epoch`, `exclude`), from the plan alone, reading nothing: what a resume at another world size
        leaves out of the rest of the epoch. It mirrors `DecodedSplit.batches` (`cached`) or `__iter__`;
        samples lost to damage are taken to be where the manifest counts them."""
        o = self.opts
        if cached:
            plan = plan_worker(self.counts, rank=self.rank, world=self.world, worker=0, num_workers=1,
                               batch_size=o.batch_size, epoch=0, seed=o.seed, shuffle=o.train)
            share = positions(self.counts, plan.slices)
            sizes = [max(1, n) for n in plan.batch_sizes]
            order, _ = decoded_order(len(share), sum(sizes), o.seed, self.epoch, self.rank, o.train)
            return [share[i] for i in order[: sum(sizes[:batches])].tolist()]
        out = []
        for worker in range(num_workers):
            plan = plan_worker(self.counts, rank=self.rank, world=self.world, worker=worker,
                               num_workers=num_workers, batch_size=o.batch_size, epoch=self.epoch, seed=o.seed,
                               shuffle=o.train, exclude=self.exclude)
            rng = random.Random(f"shuffle/{o.seed}/{self.epoch}/{self.rank}/{worker}/0")  # as in __iter__
            read = [x for chunk in shuffle([positions(self.counts, plan.slices)], o.shuffle_buffer if o.train
                                           else 0, rng) for x in chunk]
            mine = batches_before(batches, worker, num_workers)
            for _, _, items in itertools.islice(group([read], plan.batch_sizes, 0), mine):
                out += items
        return out

    def _resampled_slices(self, worker: int) -> Iterator[Slice]:
        """Whole shards drawn with replacement, weighted by size (each sample equally likely)."""
        rng = random.Random(f"resampled/{self.opts.seed}/{self.epoch}/{self.rank}/{worker}/{self.start}")
        population = range(len(self.counts))
        while True:
            shard = rng.choices(population, weights=self.counts)[0]
            yield Slice(shard, 0, self.counts[shard])

    def prepare(self, raw: Raw, tensor: bool = True) -> dict[str, Any]:
        """Decode a sample and apply the deterministic transforms (resize, centre crop). `tensor=False`
        leaves an image without those transforms a numpy array (stacked in one copy by `DecodedSplit`)."""
        o = self.opts
        plain = o.kind == "image" and not (o.resize or o.center_crop)
        s = decode_sample(raw, o.kind, o.channels, o.sample_rate, o.checked, tensor=tensor or not plain)
        if o.kind == "image" and not plain:
            if o.resize:
                s["x"] = T.resize(s["x"], o.resize)
            if o.center_crop:
                s["x"] = T.center_crop(s["x"], o.center_crop)
        return s

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The random transforms of training (images: crop, flip), and audio's crop/pad and mu-law."""
        o = self.opts
        if o.kind == "image":
            if o.train and o.random_crop_padding > 0:
                x = T.random_crop(x, tuple(x.shape[-2:]), o.random_crop_padding, gen)
            if o.train and o.random_flip:
                x = T.random_flip(x, gen)
            return x
        if o.clip_samples:
            x = T.crop_or_pad(x, o.clip_samples, gen if o.train else None)
        if o.mu_law:
            x = T.mu_law_encode(x, o.mu_law)
        return x

    @property
    def augments(self) -> bool:
        o = self.opts
        return o.kind != "image" or (o.train and (o.random_crop_padding > 0 or o.random_flip))

    def decode_one(self, raw: Raw, gen: torch.Generator) -> dict[str, Any]:
        s = self.prepare(raw)
        s["x"] = self.augment(s["x"], gen)
        return s


class DecodedSplit:
    """One rank's share of a split, decoded once into memory; each epoch a seeded permutation of it.

    The share is the rank's samples under the plan of epoch 0 (a rank keeps the same samples every epoch;
    together the ranks still cover the split exactly once). Random transforms are drawn per batch, seeded
    by (seed, epoch, rank, batch index), so a resumed run gets the same batches. When damage cost the rank
    samples, the epoch's missing ones are stand-ins drawn at random from its good ones, a different sample
    each (twice the shortfall at most, until more than half of the share is lost).
    """

    def __init__(self, stream: ShardStream) -> None:
        o, self.stream = stream.opts, stream
        plan = plan_worker(stream.counts, rank=stream.rank, world=stream.world, worker=0, num_workers=1,
                           batch_size=o.batch_size, epoch=0, seed=o.seed, shuffle=o.train)
        # A rank with fewer samples than steps (batch size 1, uneven split) fills its empty step with a stand-in.
        self.sizes = [max(1, n) for n in plan.batch_sizes]
        self.skips = _Skips(o.on_bad_sample)
        samples = []
        for chunk in read_slices(stream.urls, plan.slices, self.skips):
            for raw in chunk:
                try:
                    samples.append(stream.prepare(raw, tensor=False))
                except DataError:
                    raise
                except Exception as err:  # noqa: BLE001  any decoding error means "this sample is bad"
                    self.skips.bad(f"sample {raw.get('__key__')} in shard {raw.get('__url__')}: "
                                   f"{type(err).__name__}: {err}")
        if not samples and self.sizes:
            raise DataError(f"rank {stream.rank} could read none of its {sum(self.sizes)} samples of {stream.urls[0]}"
                            " ...: check the shards (`scalegen data prepare` rewrites damaged ones)")
        self.batch = collate_samples(samples) if samples else {}

    def __len__(self) -> int:
        return len(self.sizes)

    def batches(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        o, n, planned = self.stream.opts, len(self.batch.get("key", ())), sum(self.sizes)
        order, stand_in = decoded_order(n, planned, o.seed, epoch, self.stream.rank, o.train)
        ends = torch.tensor(self.sizes).cumsum(0).tolist()
        stand_ins = [0, *stand_in.cumsum(0).tolist()]  # stand-ins before each place: per batch, a difference
        # Damage is counted once, in the run's first batch: a resumed run restored the total from its checkpoint.
        skipped = self.skips.skipped if (epoch, start) == (0, 0) else 0
        self.skips.skipped = 0
        for g in range(start, len(self.sizes)):
            a, b = ends[g] - self.sizes[g], ends[g]
            idx = order[a:b]
            # index_select, not v[idx]: the same rows, copied far faster for a uint8 image tensor (docs/benchmarks.md)
            out = {k: (v.index_select(0, idx) if isinstance(v, torch.Tensor) else [v[i] for i in idx.tolist()])
                   for k, v in self.batch.items()}
            if self.stream.augments:
                aug = torch.Generator().manual_seed(hash_seed(o.seed, epoch, self.stream.rank, -1, g))
                out["x"] = torch.stack([self.stream.augment(x, aug) for x in out["x"]])
            out["skipped"], skipped = skipped, 0
            out["replaced"] = stand_ins[b] - stand_ins[a]
            yield out


def decoded_order(n: int, planned: int, seed: int, epoch: int, rank: int,
                  train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An epoch's order of a decoded share of `n` samples filling `planned` places: (indices, stand-in mask).
    When damage left fewer than planned, distinct good samples fill the rest, placed at random."""
    gen = torch.Generator().manual_seed(hash_seed(seed, epoch, rank, -2))
    order = torch.randperm(n, generator=gen) if train else torch.arange(n)
    stand_in = torch.zeros(planned, dtype=torch.bool)
    if planned > n:
        extra = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-(planned - n) // n))])
        order = torch.cat([order, extra[: planned - n]])
        stand_in[n:] = True
        if train:
            mix = torch.randperm(planned, generator=gen)
            order, stand_in = order[mix], stand_in[mix]
    return order, stand_in


# ---- stages ----------------------------------------------------------------------------------------
# Stages up to `group` pass lists of raw samples (one generator step per list, not per sample).
def read_slices(urls: Sequence[str], slices: Iterable[Slice], skips: _Skips) -> Iterator[list[Raw]]:
    """The samples of each slice. A sample's position is its index among the shard's readable samples, the
    same for every reader of the shard, so samples lost to damage shorten only the slice holding the
    shard's end; what a slice lacks is counted there."""
    for sl in slices:
        url, got, last_key = urls[sl.shard], 0, None
        want, seen, part = sl.stop - sl.start, 0, []
        try:
            for sample in iter_shard(url, on_damage=skips.damage):
                if seen >= sl.start:
                    sample["__url__"] = url
                    part.append(sample)
                    if len(part) == 256:
                        got, last_key = got + len(part), part[-1]["__key__"]
                        yield part
                        part = []
                seen += 1
                if seen >= sl.stop:
                    break
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001  OS, pipe and decompression errors: the rest of the shard is lost
            skips.damage(f"shard {url} unreadable after {seen} samples: {type(err).__name__}: {err}")
        if part:
            got, last_key = got + len(part), part[-1]["__key__"]
            yield part
        if got < want:
            where = f"after key {last_key}" if last_key else f"before sample {sl.start}"
            skips.bad(f"shard {url} ended {where}: {got} of {want} planned samples", want - got)


def shuffle(chunks: Iterable[list[Raw]], buffer: int, rng: random.Random) -> Iterator[list[Raw]]:
    """A shuffle buffer: a permutation of the stream (nothing dropped or repeated); buffer <= 1 is a no-op.
    Each sample arriving in a full buffer swaps with a uniformly drawn held one, which leaves."""
    if buffer <= 1:
        yield from chunks
        return
    held: list[Raw] = []
    for chunk in chunks:
        out = []
        for item in chunk:
            if len(held) < buffer:
                held.append(item)
                continue
            i = rng.randrange(buffer)
            out.append(held[i])
            held[i] = item
        if out:
            yield out
    rng.shuffle(held)
    yield held


def group(chunks: Iterable[list[Raw]], sizes: Iterable[int], first: int) -> Iterator[tuple[int, int, list[Raw]]]:
    """Exactly one group per planned size, numbered from `first`: (index, size, raws), the raws short (even
    empty) if the stream ran dry."""
    it = iter(chunks)
    pending: list[Raw] = []
    for j, size in enumerate(sizes):
        while len(pending) < size:
            more = next(it, None)
            if more is None:
                break
            pending.extend(more)
        yield first + j, size, pending[:size]
        del pending[:size]


def drop(stream: Iterable[Any], n: int) -> Iterator[Any]:
    for i, item in enumerate(stream):
        if i >= n:
            yield item


class Spares:
    """A uniform sample (reservoir) of the good samples decoded so far this epoch, to stand in for missing
    ones; each leaves when used, so damage makes no sample appear more than twice."""

    def __init__(self, capacity: int, rng: random.Random) -> None:
        self.capacity, self.rng, self.held, self.seen = capacity, rng, [], 0

    def offer(self, sample: dict[str, Any]) -> None:
        self.seen += 1
        if len(self.held) < self.capacity:
            self.held.append(sample)
        elif (i := self.rng.randrange(self.seen)) < self.capacity:
            self.held[i] = sample

    def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        while self.held and len(out) < n:
            i = self.rng.randrange(len(self.held))
            self.held[i], self.held[-1] = self.held[-1], self.held[i]
            out.append(self.held.pop())
        return out


def decode_batches(
    stream: Iterable[tuple[int, int, list[Raw]]],
    decode_one: Callable[[Raw, torch.Generator], Any],
    skips: _Skips,
    seed: tuple[int, ...],
    spares: Spares,
) -> Iterator[list[dict[str, Any]]]:
    """Decode and transform each sample; undecodable ones are skipped (and counted), and a batch left
    short is filled from `spares`.

    Random transforms draw from a generator seeded by (seed, epoch, rank, batch index), so a batch's
    augmentation does not depend on what was read before it (resume gives identical batches).
    """
    recent: list[dict[str, Any]] = []
    for index, size, raws in stream:
        gen = torch.Generator().manual_seed(hash_seed(*seed, index))
        out: list[dict[str, Any]] = []
        for raw in raws:
            try:
                out.append(decode_one(raw, gen))
            except DataError:
                raise
            except Exception as err:  # noqa: BLE001  any decoding error means "this sample is bad"
                skips.bad(f"sample {raw.get('__key__')} in shard {raw.get('__url__')}: {type(err).__name__}: {err}")
        size = max(1, size)  # a rank with fewer samples than steps fills its empty step with a stand-in
        fill = spares.take(size - len(out)) if len(out) < size else []
        for s in out:
            spares.offer(s)
        if not out and not fill:
            # More lost than the reservoir holds: the previous batch stands in (only when streaming; the
            # decoded-once path never needs this). Every rank must still take this step.
            if not recent:
                raise DataError(f"no readable sample to fill batch {index} with (every sample so far was bad): "
                                "check the shards (`scalegen data prepare` rewrites damaged ones)")
            fill = recent
        skips.replaced += len(fill)
        recent = out + fill
        yield recent


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> one batch dict: `x` stacked, `y` int64, `key` a list, other fields as tensors or lists."""
    shapes = {tuple(s["x"].shape) for s in samples}
    if len(shapes) > 1:
        raise DataError(
            f"examples of different shapes {sorted(shapes)} in a batch (first key {samples[0]['key']}): "
            "set data.resize and data.center_crop (images) or data.clip_samples (audio)"
        )
    xs = [s["x"] for s in samples]
    batch: dict[str, Any] = {
        "x": torch.stack(xs) if isinstance(xs[0], torch.Tensor) else _stack_arrays(xs),
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
    return batch


def _stack_arrays(xs: Sequence[np.ndarray]) -> torch.Tensor:
    """np.stack of same-shape C-contiguous arrays (what `decode_image` returns) through one bytes join, which is
    faster for the many small read-only views of shard bytes a decoded split holds (docs/benchmarks.md); the
    bytearray makes the result writable."""
    return torch.from_numpy(np.frombuffer(bytearray().join(xs), xs[0].dtype).reshape(len(xs), *xs[0].shape))


def collate(stream: Iterable[list[dict[str, Any]]], skips: _Skips) -> Iterator[dict[str, Any]]:
    for samples in stream:
        yield {**collate_samples(samples), **skips.deltas()}


def _forever(n: int) -> Iterator[int]:
    while True:
        yield n


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
