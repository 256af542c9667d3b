"""Typed schemas for every recipe section.

A recipe is merged onto these dataclasses in OmegaConf struct mode, so an unknown key or a value of
the wrong type fails before anything runs. A field restricted to a few values is declared with
`choice(...)`; the loader checks it. Each family registers its own `model` schema (see
`scalegen.registry`), which subclasses `ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def choice(default: str, *others: str) -> Any:
    """A string field that only takes the listed values (checked when a recipe is loaded)."""
    return field(default=default, metadata={"choices": (default, *others)})


def ranged(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, default_factory: Any = None) -> Any:
    """A numeric field with its valid range beside its definition (checked when a recipe is loaded;
    None always passes for an Optional field). `ranged(64, ge=1)`, `ranged(0.999, ge=0, le=1)`."""
    bounds = {name: v for name, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"range": bounds})
    return field(default=default, metadata={"range": bounds})


@dataclass
class ModelConfig:
    family: str = "???"  # registered family name; `scalegen recipes` and the error for a wrong one list them


@dataclass
class DataConfig:
    dataset: str = "digits"  # built-in (digits, mnist, cifar10, fsdd) or any name for packed data
    root: str = "${oc.env:SCALEGEN_DATA,'~/.cache/scalegen/data'}/${.dataset}"  # folder with manifest.json
    train: str = ""  # shard URLs (brace patterns, pipe:, s3://...); "" = the manifest's train shards in root
    val: str = ""  # shard URLs for validation; "" = the manifest's val shards, else its test shards
    test: str = ""  # shard URLs for the test split; "" = the manifest's test shards
    prepare: bool = True  # prepare a built-in dataset into `root` on first use when it has no manifest
    source: str | None = None  # local copy in the upstream format to prepare from (no download)
    batch_size: int = 64  # per device, per step (at most; see docs/data.md); see trainer.global_batch_size
    num_workers: int = 0  # DataLoader worker processes per rank
    cache_bytes: int = ranged(4 << 30, ge=0)  # decode a split once into memory when a rank's share fits (0 = stream)
    shuffle_buffer: int = 1000  # samples in each worker's shuffle buffer (0: shard order is still shuffled)
    resampled: bool = False  # infinite stream of shards sampled with replacement, for step-counted runs
    seed: int | None = None  # shard order, shuffle and augmentation seed; None = trainer.seed
    on_bad_sample: str = choice("warn", "raise")  # skip corrupt shards/samples with a warning, or fail
    # Partly labelled training data (docs/data.md): y = -1 for all but N examples per class.
    labels_per_class: int | None = ranged(None, ge=1)  # keep the labels of exactly N training examples per class
    label_seed: int = ranged(0, ge=0)  # which examples keep their labels (the same on every rank and resume)
    # Image transforms, applied to training batches only.
    random_flip: bool = False  # horizontal flip with probability 1/2
    random_crop_padding: int = 0  # pad by this many pixels (reflect) and crop back at random
    resize: int | None = None  # resize the shorter side to this many pixels (bilinear)
    center_crop: int | None = None  # centre crop to a square of this size
    # Audio.
    clip_samples: int = 4000  # crop (random in training) or zero-pad every clip to this many samples
    mu_law: int = 0  # >0: quantize audio to this many mu-law levels (x becomes int64 codes)


@dataclass
class OptimConfig:
    name: str = choice("adamw", "adam", "sgd")
    lr: float = 1e-3  # peak learning rate, for the reference global batch (see scale_lr)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam(W) moment decays
    momentum: float = 0.9  # SGD only
    eps: float = 1e-8  # Adam(W) denominator epsilon
    schedule: str = choice("constant", "cosine", "linear")  # decay after warm-up, to min_lr_ratio * lr
    warmup_steps: int = 0  # linear warm-up from 0 over this many optimizer steps
    min_lr_ratio: float = 0.0  # final lr as a fraction of the peak, for cosine and linear
    scale_lr: str = choice("none", "linear", "sqrt")  # scale lr with global batch / reference_batch_size
    reference_batch_size: int = 0  # global batch the lr was tuned for (0 = no scaling)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = 1  # processes per node: an int, or "auto"
    num_nodes: int = 1
    strategy: str = choice(
        "auto", "ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3",
    )
    precision: str = choice("32-true", "bf16-mixed", "16-mixed", "bf16-true")
    max_steps: int = -1  # optimizer steps; -1 = bounded by max_epochs
    max_epochs: int | None = None
    global_batch_size: int | None = None  # fixed across world sizes: accumulation is derived from it
    accumulate_grad_batches: int = 1  # ignored when global_batch_size is set
    gradient_clip_val: float | None = None  # clip the global gradient norm to this value
    # Scale-out options (read only by scalegen.distributed; see docs/cluster.md).
    find_unused_parameters: bool = False  # DDP: allow parameters without a gradient in a step (slower)
    offload_optimizer: bool = False  # DeepSpeed ZeRO 1-3: keep optimizer state in CPU memory (ZeRO-Offload)
    offload_parameters: bool = False  # DeepSpeed ZeRO-3 / FSDP: keep parameters in CPU memory between uses
    loss_scale: float = 0.0  # 16-mixed only: 0 = dynamic loss scaling, > 0 = this fixed scale
    initial_scale_power: int = 16  # 16-mixed, dynamic: the loss scale starts at 2**this
    loss_scale_window: int = 1000  # 16-mixed, dynamic: steps without overflow before the scale doubles
    hysteresis: int = 2  # 16-mixed, dynamic: consecutive overflows before the scale is halved
    min_loss_scale: float = 1.0  # 16-mixed, dynamic: the scale never drops below this
    requeue_signal: str = choice("SIGUSR1", "SIGUSR2")  # SLURM: checkpoint + requeue on this signal
    val_check_interval: int | None = None  # validate every N training batches (None = each epoch)
    check_val_every_n_epoch: int | None = 1
    limit_val_batches: float | None = None  # int = batches, float = fraction of the val split
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 10
    seed: int = 0
    deterministic: bool = False  # torch deterministic algorithms (bitwise reproducible on CPU)
    resume: str = "auto"  # auto = newest checkpoint in the run folder, never, or a checkpoint path
    progress_bar: bool = True  # Rich progress bar
    record_sample_keys: bool = False  # write each rank's training sample keys to {run}/sample_keys (audit sharding)


@dataclass
class LoggingConfig:
    wandb: bool = True  # log to Weights & Biases (see mode)
    project: str = "scalegen"
    entity: str | None = None
    mode: str = choice("offline", "online", "disabled")  # offline needs no network; `wandb sync` later
    tags: list[str] = field(default_factory=list)
    metrics_file: str = "metrics.jsonl"  # always written in the run folder, one JSON object per log call


@dataclass
class CheckpointConfig:
    monitor: str | None = None  # metric that picks the best checkpoint; null = the family's (none for GANs)
    mode: str = choice("min", "max")  # for a `monitor` set here; the family's own has its own mode
    save_last: bool = True  # checkpoints/last.ckpt, what trainer.resume=auto continues from
    save_top_k: int = 1  # best checkpoints kept by `monitor`
    every_n_train_steps: int | None = None  # also checkpoint every N optimizer steps
    every_n_epochs: int | None = 1


@dataclass
class EMAConfig:
    enabled: bool = False  # keep an exponential moving average of the weights
    decay: float = 0.999
    warmup_steps: int = 0  # decay ramps as min(decay, (1+t)/(10+t)) until then
    every_n_steps: int = 1  # update the average every N optimizer steps
    use_for_eval: bool = True  # sample and evaluate with the averaged weights
    update_on_cpu: bool = False  # keep the average in CPU memory (saves accelerator memory, slower updates)


@dataclass
class FinetuneConfig:
    init_from: str | None = None  # release folder, file:// or https:// URL to start from (scalegen finetune)
    use_ema: bool = True  # start from the release's EMA weights when it has them, else the raw weights
    reinit: list[str] = field(default_factory=list)  # glob patterns of parameter names to re-initialize
    # (e.g. ["decoder.out.*"]) when their shapes differ from the release; any other mismatch is an error
    sha256: str | None = None  # expected SHA256 of the release's SHA256SUMS file, for URLs (optional pin)


@dataclass
class EvalConfig:
    """The evaluation pipeline: `scalegen eval`, and during training (see docs/evaluation.md)."""

    every_n_steps: int | None = None  # evaluate during training every N optimizer steps (None = never)
    metrics: list[str] = field(default_factory=list)  # of bpd,fid,kid,is,linear_probe,semisup; [] = all that apply
    split: str = "test"  # split that bits/dim and probe accuracies are measured on
    max_examples: int | None = None  # only the first N examples of `split` (None = all)
    batch_size: int = 256  # examples per forward pass and rank (nll, sample, encode, features)
    seed: int = 0  # sampling and probe seed (rank r samples with seed + 7919 r)
    # Bits/dim.
    iwae_k: int = 1000  # IWAE-k bound when the family's nll accepts k (VAEs); 1 = the ELBO only
    # FID, KID, Inception Score.
    num_samples: int = 1000  # generated samples for FID/KID/IS (50000 for reporting)
    reference_split: str = "train"  # split the generated samples are compared with
    reference_examples: int | None = 50000  # reference statistics from its first N examples (None = all)
    inception_weights: str | None = None  # path/URL of the FID Inception weights; None = $SCALEGEN_INCEPTION_WEIGHTS
    domain_fid: bool = True  # also domain FID (a classifier trained on the data) for small grey images
    kid_subsets: int = 100  # KID: random subsets averaged
    kid_subset_size: int = 1000  # KID: examples per subset (capped by the smaller set)
    is_splits: int = 10  # Inception Score: equal chunks the score is averaged over
    # Probes.
    probe_split: str = "train"  # split the probes are trained on (tested on `split`)
    probe_train_examples: int | None = None  # only the first N examples of probe_split (None = all)
    probe_seeds: int = 3  # seeds per probe (validation part, init, batch order, labelled examples)
    probe_steps: int = 300  # optimizer steps per probe fit
    labels_per_class: int = 10  # semi-supervised accuracy: labels per class
    label_curve: list[int] = field(default_factory=lambda: [1, 10, 100])  # labels/class, accuracy figure
    out_dir: str | None = None  # periodic eval reports go here (None = {run}/eval/step-XXXXXXX)
    log_wandb: bool = True  # also log metrics and report figures to the active W&B run


@dataclass
class RunConfig:
    dir: str = "runs"  # parent folder of run folders
    name: str = "${model.family}-${data.dataset}"  # the run folder is {dir}/{name}


@dataclass
class Config:
    description: str = ""  # one line, shown by `scalegen recipes`
    model: Any = None  # replaced by the family's schema when the recipe is loaded
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: RunConfig = field(default_factory=RunConfig)
