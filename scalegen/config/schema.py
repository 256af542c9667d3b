"""Typed schemas for every recipe section.

A recipe is merged onto these dataclasses in OmegaConf struct mode, so an unknown key or a value of
the wrong type fails before anything runs. A field restricted to a few values is declared with
`choice(...)`, a numeric field with its valid range by `ranged(...)`; the loader checks both.
Each family registers its own `model` schema (see `scalegen.registry`), which subclasses `ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scalegen.ema_profiles import MAX_SIGMA_REL


def choice(default: str, *others: str) -> Any:
    """A string field that only takes the listed values (checked when a recipe is loaded)."""
    return field(default=default, metadata={"choices": (default, *others)})


Bound = float | str | None


def ranged(default: Any = None, *, ge: Bound = None, gt: Bound = None, le: Bound = None, lt: Bound = None,
           default_factory: Any = None) -> Any:
    """A numeric field with its valid range beside its definition (checked when a recipe is loaded;
    None always passes for an Optional field). `ranged(64, ge=1)`, `ranged(0.999, ge=0, le=1)`.

    A list field (`betas`) is checked element by element. A bound may name a sibling field of the same
    section, `ranged(50, ge=1, le="timesteps")`: checked against the final value of that field. A float
    must also be finite. `ranged(x)` without bounds declares a number that may take any finite value."""
    bounds = {name: v for name, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"range": bounds})
    return field(default=default, metadata={"range": bounds})


def describe_range(bounds: dict[str, Any]) -> str:
    """`{"ge": 0, "lt": 1}` -> "in [0, 1)", `{"gt": 0}` -> "> 0", `{}` -> "finite": a `ranged` field's range."""
    lo = next(((op, v) for op, v in bounds.items() if op in ("ge", "gt")), None)
    hi = next(((op, v) for op, v in bounds.items() if op in ("le", "lt")), None)
    if lo and hi:
        return f"in {'[' if lo[0] == 'ge' else '('}{lo[1]}, {hi[1]}{']' if hi[0] == 'le' else ')'}"
    if lo or hi:
        op, v = lo or hi  # type: ignore[misc]
        return f"{_SYMBOLS[op]} {v}"
    return "finite"


_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


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
    batch_size: int = ranged(64, ge=1)  # per device and step (at most; see docs/data.md); see trainer.global_batch_size
    num_workers: int = ranged(0, ge=0)  # DataLoader worker processes per rank (streaming only)
    cache_bytes: int = ranged(4 << 30, ge=0)  # decode a split once into memory when a rank's share fits (0 = stream)
    shuffle_buffer: int = ranged(1000, ge=0)  # samples in each worker's shuffle buffer (0: shard order still shuffled)
    resampled: bool = False  # infinite stream of shards sampled with replacement, for step-counted runs
    seed: int | None = ranged(None, ge=0)  # shard order, shuffle and augmentation seed; None = trainer.seed
    on_bad_sample: str = choice("warn", "raise")  # skip corrupt shards/samples with a warning, or fail
    # Partly labelled training data (docs/data.md): y = -1 for all but N examples per class.
    labels_per_class: int | None = ranged(None, ge=1)  # keep the labels of exactly N training examples per class
    label_seed: int = ranged(0, ge=0)  # which examples keep their labels (the same on every rank and resume)
    # Image transforms, applied to training batches only.
    random_flip: bool = False  # horizontal flip with probability 1/2
    random_crop_padding: int = ranged(0, ge=0)  # pad by this many pixels (reflect) and crop back at random
    resize: int | None = ranged(None, ge=1)  # resize the shorter side to this many pixels (bilinear)
    center_crop: int | None = ranged(None, ge=1)  # centre crop to a square of this size
    # Audio.
    clip_samples: int = ranged(4000, ge=1)  # crop (random in training) or zero-pad every clip to this length
    mu_law: int = ranged(0, ge=0, le=65536)  # >= 2: quantize audio to this many mu-law levels (int64 codes); 0 = off


@dataclass
class OptimConfig:
    name: str = choice("adamw", "adam", "sgd")
    lr: float = ranged(1e-3, gt=0)  # peak learning rate, for the reference global batch (see scale_lr)
    weight_decay: float = ranged(0.0, ge=0)  # decoupled (adamw) or L2 (adam, sgd) weight decay
    betas: list[float] = ranged(ge=0, lt=1, default_factory=lambda: [0.9, 0.999])  # Adam(W) moment decays
    momentum: float = ranged(0.9, ge=0, lt=1)  # SGD only (a decay: 1 would never forget a gradient)
    eps: float = ranged(1e-8, gt=0)  # Adam(W) denominator epsilon
    schedule: str = choice("constant", "cosine", "linear")  # decay after warm-up, to min_lr_ratio * lr
    warmup_steps: int = ranged(0, ge=0)  # linear warm-up from 0 over this many optimizer steps
    min_lr_ratio: float = ranged(0.0, ge=0, le=1)  # final lr as a fraction of the peak, for cosine and linear
    scale_lr: str = choice("none", "linear", "sqrt")  # scale lr with global batch / reference_batch_size
    reference_batch_size: int = ranged(0, ge=0)  # global batch the lr was tuned for (0 = no scaling)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = 1  # processes per node: an int, or "auto"
    num_nodes: int = ranged(1, ge=1)
    strategy: str = choice(
        "auto", "ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3",
    )
    precision: str = choice("32-true", "bf16-mixed", "16-mixed", "bf16-true")
    max_steps: int = ranged(-1, ge=-1)  # optimizer steps; -1 = bounded by max_epochs
    max_epochs: int | None = ranged(None, ge=-1)  # -1 = until stopped; None = bounded by max_steps (one must be set)
    global_batch_size: int | None = ranged(None, ge=1)  # fixed across world sizes: accumulation derives from it
    accumulate_grad_batches: int = ranged(1, ge=1)  # ignored when global_batch_size is set
    gradient_clip_val: float | None = ranged(None, ge=0)  # clip the global gradient norm to this value (0 = off)
    compile: bool = False  # torch.compile each network of the family (docs/benchmarks.md: when it pays)
    compile_mode: str = choice("default", "reduce-overhead", "max-autotune")  # torch.compile's mode
    # Scale-out options (read only by scalegen.distributed; see docs/cluster.md).
    find_unused_parameters: bool = False  # DDP: allow parameters without a gradient in a step (slower)
    offload_optimizer: bool = False  # DeepSpeed ZeRO 1-3: keep optimizer state in CPU memory (ZeRO-Offload)
    offload_parameters: bool = False  # DeepSpeed ZeRO-3 / FSDP: keep parameters in CPU memory between uses
    loss_scale: float = ranged(0.0, ge=0)  # 16-mixed only: 0 = dynamic loss scaling, > 0 = this fixed scale
    initial_scale_power: int = ranged(16, ge=0, le=64)  # 16-mixed, dynamic: the loss scale starts at 2**this
    loss_scale_window: int = ranged(1000, ge=1)  # 16-mixed, dynamic: steps without overflow before scale doubles
    hysteresis: int = ranged(2, ge=1)  # 16-mixed, dynamic: consecutive overflows before the scale is halved
    min_loss_scale: float = ranged(1.0, gt=0)  # 16-mixed, dynamic: the scale never drops below this
    requeue_signal: str = choice("SIGUSR1", "SIGUSR2")  # SLURM: checkpoint + requeue on this signal
    val_check_interval: int | None = ranged(None, ge=1)  # validate every N training batches (None = each epoch)
    check_val_every_n_epoch: int | None = ranged(1, ge=1)  # validate every N epochs (unused with val_check_interval)
    limit_val_batches: int | float | None = ranged(None, ge=0)  # int: batches (1 = one); float in [0, 1]: a fraction
    num_sanity_val_steps: int = ranged(0, ge=-1)  # validation batches run before training (-1 = all)
    # (0 suits autoregressive families on a CPU: they draw one pixel per network pass.)
    val_samples: int = ranged(64, ge=0)  # samples drawn for samples.png after each validation (0 = none)
    log_every_n_steps: int = ranged(10, ge=0)  # write training scalars every N steps (0 = never)
    seed: int = ranged(0, ge=0, le=2**32 - 1)  # global seed (lightning.seed_everything: a uint32)
    deterministic: bool = False  # torch deterministic algorithms (bitwise reproducible on CPU)
    resume: str = "auto"  # auto = newest checkpoint in the run folder, never, or a checkpoint path
    # Recipe keys (glob patterns, e.g. optim.lr, trainer.max_steps, optim.*) a resume may change; any
    # other difference from the checkpoint's recipe is refused, naming the keys.
    resume_allow_changes: list[str] = field(default_factory=list)
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
    monitor: str | None = None  # best-checkpoint metric; null = the family's (none: GANs, limit_val_batches=0)
    mode: str = choice("min", "max")  # for a `monitor` set here; the family's own has its own mode
    save_last: bool = True  # checkpoints/last.ckpt, what trainer.resume=auto continues from
    save_top_k: int = ranged(1, ge=-1)  # best checkpoints kept by `monitor` (-1 = all, 0 = none)
    # Set at most one of the two below; with neither, checkpoints are taken at the end of every epoch.
    every_n_train_steps: int | None = ranged(None, ge=0)  # checkpoint every N optimizer steps (not with every_n_epochs)
    every_n_epochs: int | None = ranged(None, ge=0)  # checkpoint every N epochs (both null: every epoch; 0 = never)


@dataclass
class PostHocEMAConfig:
    """Post-hoc EMA (EDM2 sec. 3): power-function averages snapshotted in training; `scalegen ema RUN
    --sigma-rel S` reconstructs the average of any width S afterwards (docs/cluster.md, "Post-hoc EMA")."""

    enabled: bool = False  # keep the power-function EMAs below and write their snapshots (independent of ema.enabled)
    sigma_rels: list[float] = ranged(
        default_factory=lambda: [0.05, 0.1], gt=0, le=MAX_SIGMA_REL)  # EMA widths: profile std / training length
    snapshot_every_n_steps: int = ranged(1000, ge=1)  # snapshot every EMA every N optimizer steps and at the end
    dir: str | None = None  # snapshot folder; None = {run}/ema_snapshots


@dataclass
class EMAConfig:
    enabled: bool = False  # keep an exponential moving average of the weights
    decay: float = ranged(0.999, ge=0, le=1)  # average <- decay * average + (1 - decay) * weights
    warmup_steps: int = ranged(0, ge=0)  # decay ramps as min(decay, (1+t)/(10+t)) until then
    every_n_steps: int = ranged(1, ge=1)  # update the average every N optimizer steps
    use_for_eval: bool = True  # sample and evaluate with the averaged weights
    update_on_cpu: bool = False  # keep the average in CPU memory (saves accelerator memory, slower updates)
    posthoc: PostHocEMAConfig = field(default_factory=PostHocEMAConfig)


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

    every_n_steps: int | None = ranged(None, ge=1)  # evaluate in training every N optimizer steps (None = never)
    metrics: list[str] = field(default_factory=list)  # metric names (scalegen eval --help); [] = all that apply
    split: str = "test"  # split that bits/dim and probe accuracies are measured on
    max_examples: int | None = ranged(None, ge=1)  # only the first N examples of `split` (None = all)
    batch_size: int = ranged(256, ge=1)  # examples per forward pass and rank (nll, sample, encode, features)
    seed: int = ranged(0, ge=0)  # sampling and probe seed (rank r samples with seed + 7919 r)
    # Bits/dim.
    iwae_k: int = ranged(1000, ge=1)  # IWAE-k bound when the family's nll accepts k (VAEs); 1 = the ELBO only
    # Inference gaps (metric inference_gap, scalegen.eval.gaps); log p(x) is IWAE-iwae_k.
    gap_examples: int = ranged(100, ge=1)  # the first N examples of `split`
    gap_steps: int = ranged(100, ge=1)  # Adam steps on each example's posterior parameters
    gap_lr: float = ranged(1e-2, gt=0)  # their learning rate
    gap_opt_samples: int = ranged(8, ge=1)  # latent samples per step's ELBO gradient
    gap_samples: int = ranged(100, ge=1)  # latent samples for each reported ELBO
    # ODE likelihood (bpd_ode) of families with a velocity field (scalegen.objectives.ode_likelihood).
    ode_max_examples: int | None = ranged(1000, ge=1)  # first N of the bpd examples (an ODE solve each); None = all
    ode_divergence: str = choice("auto", "exact", "hutchinson")  # auto: exact if D <= ode_exact_max_dims
    ode_exact_max_dims: int = ranged(16, ge=0)  # auto's threshold (exact costs one backward pass per dimension)
    ode_probes: int = ranged(1, ge=1)  # Hutchinson probes per example, drawn once per solve (FFJORD)
    ode_probe: str = choice("rademacher", "gaussian")  # Hutchinson probe distribution (both have E[z z^T] = I)
    ode_method: str = choice("adaptive", "heun", "euler")  # adaptive: dopri5 with ode_rtol/ode_atol; else ode_steps
    ode_steps: int = ranged(100, ge=1)  # equal steps of heun/euler
    ode_rtol: float = ranged(1e-5, gt=0)  # dopri5 relative tolerance (Song et al. 2021: 1e-5)
    ode_atol: float = ranged(1e-5, gt=0)  # dopri5 absolute tolerance (Song et al. 2021: 1e-5)
    # FID, KID, Inception Score.
    num_samples: int = ranged(1000, ge=2)  # generated samples for FID/KID/IS (50000 for reporting; FID needs 2)
    reference_split: str = "train"  # split the generated samples are compared with
    reference_examples: int | None = ranged(50000, ge=2)  # reference statistics from its first N (None = all)
    inception_weights: str | None = None  # path/URL of the FID Inception weights; None = $SCALEGEN_INCEPTION_WEIGHTS
    inception_precision: str = choice("fp32", "bf16")  # bf16: Inception under autocast (FID differs, see benchmarks)
    domain_fid: bool = True  # also domain FID (a classifier trained on the data) for small grey images
    kid_subsets: int = ranged(100, ge=1)  # KID: random subsets averaged
    kid_subset_size: int = ranged(1000, ge=2)  # KID: examples per subset (capped by the smaller set)
    is_splits: int = ranged(10, ge=1)  # Inception Score: equal chunks the score is averaged over
    # Precision/recall and density/coverage, on the same features as FID (docs/evaluation.md).
    prdc_examples: int = ranged(10000, ge=0)  # real and generated features each (capped by both counts); 0 = off
    prdc_k: int = ranged(3, ge=1)  # k-NN radius of precision and recall (Kynkaanniemi et al. 2019)
    density_coverage_k: int = ranged(5, ge=1)  # k-NN radius of density and coverage (Naeem et al. 2020)
    # Out-of-distribution detection (families that classify), beyond the built-in corruptions.
    ood_data: str | None = None  # folder of prepared shards (with manifest.json): its images are one more OOD set
    ood_split: str = "test"  # split of ood_data that is used
    ood_examples: int | None = ranged(10000, ge=1)  # only its first N examples (None = all)
    # Probes.
    probe_split: str = "train"  # split the probes are trained on (tested on `split`)
    probe_train_examples: int | None = ranged(None, ge=1)  # only the first N of probe_split (None = all)
    probe_seeds: int = ranged(3, ge=1)  # seeds per probe (validation part, init, batch order, labelled examples)
    probe_steps: int = ranged(300, ge=1)  # optimizer steps per probe fit
    labels_per_class: int = ranged(10, ge=1)  # semi-supervised accuracy: labels per class
    label_curve: list[int] = ranged(ge=1, default_factory=lambda: [1, 10, 100])  # labels/class, figure
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
