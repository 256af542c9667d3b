"""`ShardDataModule`: the Lightning DataModule every recipe reads its data through.

It reads `{root}/manifest.json` (preparing a built-in dataset there first when asked), resolves each
split's shard URLs, checks they exist before training, and hands out one `ShardLoader` per split.
The training loader's position (epoch, batches consumed) is in the DataModule's `state_dict()`, the one
copy Lightning saves in every checkpoint, so a resumed run continues from the next unseen batch.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from scalegen.config.schema import DataConfig
from scalegen.data.labels import LabelledSet, choose_labelled, mask_labels
from scalegen.data.manifest import MANIFEST, DataError, Manifest
from scalegen.data.pipeline import DecodedSplit, ShardStream, StreamOptions, hash_seed
from scalegen.data.prepare import PREPARERS, prepare_dataset
from scalegen.data.shards import expand_urls, iter_shard, join_url, read_manifest, shard_name, url_exists
from scalegen.data.split import pack_positions, unpack_positions
from scalegen.data.transforms import resized_shape
from scalegen.dataspec import DataSpec


def expand_root(root: str) -> str:
    """`~` and environment variables expanded; URLs (s3://...) left as they are."""
    return root if "://" in root else os.path.expanduser(os.path.expandvars(root))


def build_datamodule(cfg: DataConfig, labelled_stream: bool = False) -> ShardDataModule:
    """The DataModule for a recipe's `data` section (prepares a built-in dataset on first use).
    `labelled_stream`: the family's class attribute of that name (training batches then also carry
    `x_labelled`, `y_labelled`, `key_labelled`; see scalegen/data/labels.py)."""
    return ShardDataModule(cfg, labelled_stream=labelled_stream)


class ShardLoader:
    """Batches of one split for this rank, and its position (the one place the data position is kept).

    When `cache_bytes` holds the rank's decoded share (`sample_bytes` each; None = not cacheable) it is
    decoded once (`DecodedSplit`) and every pass batches from memory; otherwise each pass streams a
    `ShardStream`, through persistent DataLoader workers when `num_workers > 0`.
    Iterating starts a new pass: the next epoch, or, after `set_position`, the rest of the saved one.

    The position (`position()`, `set_position()`): `epoch`; `done`, the sorted positions (scalegen.data.split)
    seen in this epoch before the current pass, with `offset` the batches they took; `consumed`, the batches
    of the current pass handed over, counted in one place, as each is yielded. (A Trainer takes each batch
    of a loader with a length when it trains on it, not before; an infinite, resampled stream it fetches one
    batch ahead, and a resume then draws afresh from a position one batch on.) The loader has no
    `state_dict`, so that Lightning saves the position once, through the DataModule's.
    Same plan on resume (world size, workers, batch size, seed, shuffle buffer, cache): the pass continues
    at batch `consumed`, batch for batch. Another plan: what the saved pass had handed over is worked out
    from its plan (`ShardStream.taken`), added to `done`, and the rest of the epoch is planned afresh over
    this run's ranks, so every sample of the epoch is still seen exactly once.
    """

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False, cache_bytes: int = 0,
                 sample_bytes: int | None = None) -> None:
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.cache_bytes, self.sample_bytes = cache_bytes, sample_bytes
        self.decoded: DecodedSplit | None = None
        self.epoch, self.consumed, self.skipped, self.replaced = 0, 0, 0, 0
        self.offset, self.done = 0, np.zeros(0, dtype=np.int64)
        self.labelled: dict[str, int] | None = None  # data.labels_per_class: the keys that keep their label
        self.labelled_set: LabelledSet | None = None  # the labelled stream's examples, when asked for
        self._started = False
        self._dataloader: DataLoader | None = None  # with workers: created at the first pass, then reused

    def __len__(self) -> int:
        """Batches of the epoch as the Trainer counts them: those before this pass and this pass's."""
        return self.offset + len(self.stream)

    def _set_done(self, done: np.ndarray, offset: int) -> None:
        self.done, self.offset = done, offset
        self.stream.exclude = done

    def __iter__(self) -> Any:
        if self._started or (not self.stream.opts.resampled and self.consumed >= len(self.stream) > 0):
            self.epoch, self.consumed = self.epoch + 1, 0  # a new pass, or the saved epoch was finished
            self._set_done(np.zeros(0, dtype=np.int64), 0)
        self._started = True
        self.stream.epoch, self.stream.start = self.epoch, self.consumed
        # The labelled stream's position: this rank's training batches over all epochs (a resampled stream
        # has no epoch length, and its passes are apart by more batches than any run takes).
        step = self.epoch * (1 << 40 if self.stream.opts.resampled else len(self)) + self.offset + self.consumed
        for batch in self._batches():
            # Workers report the bad samples skipped since their previous batch; the batch carries this
            # rank's running total (what `data/skipped_samples` logs), as a Python int.
            self.skipped += int(batch["skipped"])
            self.replaced += int(batch["replaced"])
            batch["skipped"], batch["replaced"] = self.skipped, self.replaced
            if self.labelled is not None:
                batch["y"] = mask_labels(batch["y"], batch["key"], self.labelled)
            if self.labelled_set is not None:
                batch.update(self.labelled_set.batch(step))
            step += 1
            self.consumed += 1  # the one place a batch is counted (see the class docstring)
            yield batch

    @property
    def cached(self) -> bool:
        """Whether this rank's decoded share fits the budget (then it is decoded once and kept in memory)."""
        s = self.stream
        if s.opts.resampled or self.sample_bytes is None or len(self.done):
            return False  # (the rest of an epoch resumed at another world size is streamed)
        share = -(-sum(s.counts) // s.world)
        return share * self.sample_bytes <= self.cache_bytes

    def _batches(self) -> Iterator[dict[str, Any]]:
        """This pass's batches: from memory, from worker processes, or decoded inline."""
        if self.cached:
            if self.decoded is None or self.decoded.stream is not self.stream:
                self.decoded = DecodedSplit(self.stream)
            batches = self.decoded.batches(self.epoch, self.consumed)
            return map(_pin, batches) if self.pin_memory else batches
        if self.num_workers > 0 and len(self.done):
            # The rest of an epoch resumed at another world size: workers for this pass only (persistent
            # ones keep the plan they started with, and later epochs have nothing to exclude).
            return iter(DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                   pin_memory=self.pin_memory, multiprocessing_context=_mp_context(self.num_workers),
                                   generator=torch.Generator().manual_seed(hash_seed(self.stream.opts.seed))))
        if self.num_workers > 0:
            if self._dataloader is None:
                # Persistent workers: a short epoch (the digits have 22 batches) would otherwise pay for
                # starting its worker processes again every time. Each pass, every worker re-plans from the
                # (epoch, start) the main process has just written into shared memory.
                context = _mp_context(self.num_workers)
                self.stream.share_position(multiprocessing.get_context(context))
                self._dataloader = DataLoader(
                    self.stream,
                    batch_size=None,
                    num_workers=self.num_workers,
                    pin_memory=self.pin_memory,
                    persistent_workers=True,
                    multiprocessing_context=context,
                    # Its own generator: without one, creating the iterator draws the workers' base seed
                    # from the global torch generator, a draw a run resumed at an epoch end cannot mirror.
                    generator=torch.Generator().manual_seed(hash_seed(self.stream.opts.seed, self.stream.rank)),
                )
            return iter(self._dataloader)
        # Without workers a DataLoader would only add a per-batch conversion pass (and that seed draw).
        batches = iter(self.stream)
        return map(_pin, batches) if self.pin_memory else batches

    def position(self) -> dict[str, Any]:
        """The position, as `ShardDataModule.state_dict()` saves it."""
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "offset": self.offset,
            "done": pack_positions(self.done, sum(self.stream.counts)),  # a bitmap (hex)
            **self._plan(),
            "skipped": self.skipped,
            "replaced": self.replaced,
        }

    def _plan(self) -> dict[str, Any]:
        """What decides how a pass is cut into batches (a resume with the same continues batch for batch)."""
        s = self.stream
        return {"world": s.world, "rank": s.rank, "num_workers": self.num_workers, "batch_size": s.opts.batch_size,
                "seed": s.opts.seed, "shuffle_buffer": s.opts.shuffle_buffer, "cached": self.cached}

    def set_position(self, state: dict[str, Any]) -> None:
        """Continue from a saved `position()`; the next pass is the rest of its epoch."""
        s = self.stream
        self.epoch, self.skipped = int(state["epoch"]), int(state.get("skipped", 0))
        self.replaced = int(state.get("replaced", 0))
        done = unpack_positions(state.get("done", ""), sum(s.counts))
        offset, consumed = int(state.get("offset", 0)), int(state["consumed"])
        keys = ("world", "num_workers", "batch_size", "seed", "shuffle_buffer", "cached")
        self._set_done(done, offset)
        current = self._plan()
        if s.opts.resampled or all(state.get(k, current[k]) == current[k] for k in keys):
            self.consumed = consumed
        else:
            # Another plan: every saved rank handed over `consumed` batches of the saved pass; which samples
            # those were follows from that pass's plan. The rest of the epoch is planned over this run's ranks.
            old = StreamOptions(**{**vars(s.opts), "batch_size": int(state["batch_size"]), "seed": int(state["seed"]),
                                   "shuffle_buffer": int(state.get("shuffle_buffer", s.opts.shuffle_buffer))})
            taken = []
            for rank in range(int(state["world"])):
                saved = ShardStream(s.urls, s.counts, old, rank=rank, world=int(state["world"]))
                saved.epoch, saved.exclude = self.epoch, done
                taken += saved.taken(consumed, max(1, int(state["num_workers"])), bool(state.get("cached", False)))
            done = np.union1d(done, np.asarray(taken, dtype=np.int64))
            if len(done) >= sum(s.counts):  # the saved epoch was finished
                self.epoch, done, offset, consumed = self.epoch + 1, done[:0], 0, 0
            self._set_done(done, offset + consumed if len(done) else 0)
            self.consumed = 0
        self._started = False


def _pin(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _mp_context(num_workers: int) -> str | None:
    # Forking after CUDA start-up is unsafe; plain CPU runs keep the default fork (faster start).
    return "spawn" if num_workers and torch.cuda.is_initialized() else None


class ShardDataModule(L.LightningDataModule):
    """Shards -> batches for train / val / test, split exactly once across nodes, ranks and workers."""

    def __init__(self, cfg: DataConfig, labelled_stream: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.labelled_stream = labelled_stream
        if labelled_stream and cfg.labels_per_class is None:
            raise DataError(
                "this model family trains on a labelled stream beside the main one: set data.labels_per_class "
                "(labelled examples kept per class)"
            )
        self.root = expand_root(cfg.root)
        self._manifest: Manifest | None = None
        self._loaders: dict[str, ShardLoader] = {}
        self._pending_state: dict[str, Any] | None = None

    # ---- what the model needs to know -----------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = self._load_manifest()
        return self._manifest

    @property
    def spec(self) -> DataSpec:
        """Kind, example shape after transforms, classes, levels and sample rate, from the manifest."""
        m, c = self.manifest, self.cfg
        if m.kind == "audio":
            length = c.clip_samples or (m.shape[-1] if m.shape[-1] else 0)
            if not length:
                raise DataError("clips have different lengths: set data.clip_samples to crop/pad them")
            return DataSpec(
                kind="audio",
                shape=(1, length),
                num_classes=m.num_classes,
                class_names=list(m.class_names),
                levels=c.mu_law if c.mu_law > 0 else m.levels,
                sample_rate=m.sample_rate,
            )
        ch, h, w = m.shape
        if c.resize:
            if not (h and w):
                h = w = c.resize if c.center_crop is None else c.center_crop
            else:
                h, w = resized_shape(h, w, c.resize)
        if c.center_crop:
            h = w = c.center_crop
        if not (h and w):
            raise DataError(f"images in {self.root} differ in size: set data.resize and data.center_crop")
        return DataSpec(
            kind="image",
            shape=(ch, h, w),
            num_classes=m.num_classes,
            class_names=list(m.class_names),
            levels=m.levels,
        )

    # ---- Lightning hooks --------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.manifest  # noqa: B018  (prepares a built-in dataset on first use)

    def setup(self, stage: str | None = None) -> None:
        """Check that every shard of the splits this stage needs exists (fails before training, naming it)."""
        needs = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}
        splits = needs.get(stage or "", ["train", "val", "test"])
        trainer = self._trainer
        for split in splits:
            if split == "val" and stage == "fit" and trainer is not None and trainer.limit_val_batches == 0:
                continue  # a run that never validates needs no validation split
            self._shards(split)

    def train_dataloader(self) -> ShardLoader:
        return self._loader("train")

    def val_dataloader(self) -> ShardLoader:
        return self._loader("val")

    def test_dataloader(self) -> ShardLoader:
        return self._loader("test")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Our batches are flat dicts of tensors and lists (keys): move the tensors and leave the rest, instead
        # of Lightning's generic walk, which visits every one of the batch's key strings on every step.
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        non_blocking = torch.device(device).type not in ("cpu", "mps")  # as Lightning's own transfer
        return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        """The training pipeline's position; Lightning stores it in every checkpoint (its only copy there)."""
        if "train" in self._loaders:
            return {"train": self._loaders["train"].position()}
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)
        if "train" in self._loaders and "train" in state_dict:
            self._loaders["train"].set_position(state_dict["train"])
        # Lightning warns on a mid-epoch resume unless the loader itself has a state_dict; ours is restored
        # here, through the DataModule, so that warning would be wrong.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    @property
    def skipped_samples(self) -> int:
        """Bad samples skipped so far by this rank's loaders (also per batch in `batch["skipped"]`)."""
        return sum(loader.skipped for loader in self._loaders.values())

    @property
    def replacement_samples(self) -> int:
        """Good samples that stood in for missing ones so far (also per batch in `batch["replaced"]`)."""
        return sum(loader.replaced for loader in self._loaders.values())

    # ---- internals -------------------------------------------------------------------------------
    @property
    def _trainer(self) -> Any:
        return getattr(self, "trainer", None)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self._trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _load_manifest(self) -> Manifest:
        source = os.path.expanduser(self.cfg.source) if self.cfg.source else None
        if source and os.path.isfile(os.path.join(source, MANIFEST)):  # shards given as a built-in's upstream copy
            raise DataError(f"data.source={self.cfg.source} holds shards ({MANIFEST}), but data.source is the "
                            "upstream copy a built-in dataset is prepared from; to train on these shards set "
                            f"data.dataset={read_manifest(source).name} data.root={self.cfg.source} data.prepare=false")
        has_manifest = url_exists(join_url(self.root, MANIFEST))
        if not has_manifest and self.cfg.prepare and "://" not in self.root:
            if self.cfg.dataset in PREPARERS:
                return prepare_dataset(self.cfg.dataset, self.root, source=self.cfg.source)
        return read_manifest(self.root)

    def split_name(self, split: str) -> str:
        """The manifest split a loader reads: val falls back to test when there is no val split."""
        splits = self.manifest.splits
        if split == "val" and "val" not in splits and not self.cfg.val:
            return "test"
        return split

    def shards(self, split: str) -> tuple[list[str], list[int]]:
        """(URLs, sample counts) of a split (train / val / test), after the existence check."""
        return self._shards(split)

    def _shards(self, split: str) -> tuple[list[str], list[int]]:
        """(URLs, sample counts) of a split; every URL must be listed in the manifest and must exist."""
        m = self.manifest
        name = self.split_name(split)
        spec = getattr(self.cfg, split, "")
        if split == "val" and not spec and name == "test":
            spec = self.cfg.test
        info = m.splits.get(name)
        if spec:
            urls = expand_urls(spec)
            known = {s.name: s.count for sp in m.splits.values() for s in sp.shards}
            unknown = [u for u in urls if shard_name(u) not in known]
            if unknown:
                raise DataError(
                    f"data.{split} shard {unknown[0]} is not listed in {self.root}/{MANIFEST}; "
                    "point data.root at the folder whose manifest describes these shards"
                )
            counts = [known[shard_name(u)] for u in urls]
        elif info is None or not info.shards:
            held_out = f"hold one out when packing (`scalegen data pack SRC --out DIR --{split}-fraction 0.1`)"
            fixes = {"val": f"{held_out} or train without validation (trainer.limit_val_batches=0)",
                     "test": f"{held_out} or use a split it has (for evaluation: eval.split=val)"}
            fix = fixes.get(split, "prepare it again")
            missing = "'val' or 'test'" if name != split else repr(name)  # val falls back to test
            raise DataError(f"{self.root}/{MANIFEST} has no {missing} split (it has {sorted(m.splits)}): {fix}")
        else:
            urls = [join_url(self.root, s.name) for s in info.shards]
            counts = [s.count for s in info.shards]
        for url in urls:
            if not url_exists(url):
                raise DataError(
                    f"shard {url} does not exist (data.{split}); re-run `scalegen data prepare` "
                    "or fix data.root / data." + split
                )
        return urls, counts

    def _loader(self, split: str, rank_world: tuple[int, int] | None = None) -> ShardLoader:
        """The loader of `split` for this process (or for `rank_world`: (rank, world), e.g. to plan another's)."""
        urls, counts = self._shards(split)
        rank, world = rank_world or self._rank_world()
        if sum(counts) < world:
            raise DataError(f"the {split} split has {sum(counts)} samples, fewer than the {world} ranks")
        c, m = self.cfg, self.manifest
        train = split == "train"
        opts = StreamOptions(
            kind=m.kind,
            channels=m.shape[0] if m.kind == "image" else None,
            sample_rate=m.sample_rate,
            batch_size=c.batch_size,
            train=train,
            shuffle_buffer=c.shuffle_buffer,
            resampled=c.resampled and train,
            seed=self._seed(),
            on_bad_sample=c.on_bad_sample,
            random_flip=c.random_flip,
            random_crop_padding=c.random_crop_padding,
            resize=c.resize,
            center_crop=c.center_crop,
            clip_samples=c.clip_samples if m.kind == "audio" else 0,
            mu_law=c.mu_law if m.kind == "audio" else 0,
            checked="crc32" in m.fields,
        )
        spec = self.spec
        # Decoded images are uint8 of the spec's shape; audio clips vary in length until cropped: not cached.
        sample_bytes = math.prod(spec.shape) if spec.kind == "image" else None
        loader = ShardLoader(
            ShardStream(urls, counts, opts, rank=rank, world=world),
            c.num_workers,
            pin_memory=torch.cuda.is_available(),
            cache_bytes=c.cache_bytes,
            sample_bytes=sample_bytes,
        )
        if train:
            if c.labels_per_class is not None:
                self._add_labels(loader, urls, opts)
            if self._pending_state and "train" in self._pending_state:
                loader.set_position(self._pending_state["train"])
        self._loaders[split] = loader
        return loader

    def _add_labels(self, loader: ShardLoader, urls: list[str], opts: StreamOptions) -> None:
        """Mask all labels but those of `data.labels_per_class` examples per class (and, for a labelled
        stream, decode those examples into memory). Reads every training shard's labels, on every rank."""
        c, m = self.cfg, self.manifest
        if not m.num_classes:
            raise DataError(f"data.labels_per_class is set but {self.root} has no classes (unlabelled data)")
        pairs = [(s["__key__"], int(s["cls"]) if "cls" in s else -1) for s in _readable_samples(urls)]
        loader.labelled = choose_labelled(pairs, c.labels_per_class, c.label_seed, m.num_classes)
        if not self.labelled_stream:
            return
        # Decoded with the evaluation transforms (resize, centre crop; no random ones).
        decoder = ShardStream(urls, [0] * len(urls), StreamOptions(**{**vars(opts), "train": False}))
        gen = torch.Generator().manual_seed(0)
        found = []
        for raw in _readable_samples(urls):
            if raw["__key__"] in loader.labelled:
                try:
                    found.append(decoder.decode_one(raw, gen))
                except Exception:  # noqa: BLE001  undecodable: the training loader names and counts it
                    continue
        found.sort(key=lambda s: s["key"])
        loader.labelled_set = LabelledSet(
            torch.stack([s["x"] for s in found]),
            torch.tensor([loader.labelled[s["key"]] for s in found], dtype=torch.int64),
            [s["key"] for s in found],
            batch_size=c.batch_size,
            seed=(c.label_seed, opts.seed, loader.stream.rank),
        )

    def _seed(self) -> int:
        if self.cfg.seed is not None:
            return int(self.cfg.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by lightning.seed_everything(trainer.seed)


def _readable_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """The raw samples of the shards that can be read (the training loader names and counts what is lost)."""
    for url in urls:
        try:
            yield from iter_shard(url, on_damage=lambda message: None)  # the loader warns about damage
        except Exception:  # noqa: BLE001  OS and pipe errors all mean "the rest of this shard is lost"
            continue
