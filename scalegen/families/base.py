"""The contract every model family implements, and the Lightning plumbing they share.

A family subclasses `GenerativeModel`, registers itself with `@register_family`, declares what it
offers in class attributes and implements those methods:

- `predictions`: the subset of `PREDICTIONS` it implements. Evaluation, figures and `scalegen sample`
  read this set; they never inspect signatures or look for methods.
- `nll_kind`: what `nll` returns (`NLL_KINDS`); reports name the quantity after it.
- `monitor` / `monitor_mode`: the metric that picks the best checkpoint (`checkpoint.monitor: null`
  means this one); `None` = no "best" checkpoint (a GAN's losses say nothing about its samples).
- `loss(batch)` for training; `nll(x, y, k)`, `sample(n, y)`, `encode`, `reconstruct`, `classify`,
  `energy`, `complete`, `velocity(x, t, y)` as declared.
- `rank_state()` / `load_rank_state(...)`: state that differs per rank (a replay buffer, persistent
  chains); the runtime (`scalegen.callbacks.rank_state`) keeps one per rank in every checkpoint.
- `ddp_find_unused_parameters`: read by `scalegen.distributed` when it builds the DDP strategy.
- Manual optimization (several optimizers, GANs, EBMs): `automatic_optimization = False` and one call
  of `manual_update(index, closure)` per optimizer per micro-batch; accumulation, clipping of the
  global gradient norm, mixed precision and each optimizer's LR schedule are handled there, once.
- A first stage (`stage1` in the family's config): `load_stage1()` returns it frozen, read through the
  one checkpoint reader; its sha256 goes into every checkpoint and is verified when one is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor

from scalegen.checkpoints import checkpoint_sha256, load_model, resolve_checkpoint
from scalegen.config.loader import plain
from scalegen.config.schema import ModelConfig, OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.errors import ConfigError, UserError
from scalegen.metrics.bpd import nats_to_bpd
from scalegen.optim import build_optimizer

# Named predictions a family may declare; each is the method of the same name.
PREDICTIONS = frozenset({"nll", "sample", "encode", "reconstruct", "classify", "energy", "complete", "velocity"})
# What `nll` returns: the exact NLL, a variational bound (ELBO, IWAE, diffusion VLB), an AIS estimate,
# another upper bound, or the ODE (probability-flow) likelihood.
NLL_KINDS = ("exact", "elbo", "iwae", "vlb", "ais", "bound", "ode")
IMPORTANCE_SAMPLED = ("elbo", "iwae")  # kinds whose `nll(x, y, k)` tightens with k importance samples


@contextmanager
def recipe_shapes(family: str) -> Iterator[None]:
    """Networks refuse impossible shapes with ValueError (they know nothing of recipes); inside a family's
    constructor those shapes come from the recipe, so the refusal is a one-line user error."""
    try:
        yield
    except ValueError as err:
        raise ConfigError(f"the {family} family cannot build its networks from these model.* settings: {err}") from None


class GenerativeModel(L.LightningModule):
    """Base class for every family.

    Batches are dicts: `x` (uint8 [B, C, H, W] images, or float [B, 1, T] audio in [-1, 1], or
    int64 mu-law codes [B, 1, T]), `y` (int64 [B], -1 when unlabelled) and `key`; with
    `labelled_stream = True` also `x_labelled`, `y_labelled` (see docs/data.md).
    """

    family_name: str = ""  # set by @register_family
    predictions: frozenset[str] = frozenset()
    data_kinds: frozenset[str] | None = None  # DataSpec.kind values the family models (None: any); checked in __init__
    nll_kind: str = "exact"
    monitor: str | None = "val/loss"
    monitor_mode: str = "min"
    ddp_find_unused_parameters: bool = False  # True where a backward leaves parameters without gradients
    labelled_stream: bool = False  # ask the datamodule for a labelled batch beside every training batch

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.predictions) - PREDICTIONS
        if unknown:
            raise TypeError(f"{cls.__name__}.predictions: unknown {sorted(unknown)}; known: {sorted(PREDICTIONS)}")
        if cls.nll_kind not in NLL_KINDS:
            raise TypeError(f"{cls.__name__}.nll_kind={cls.nll_kind!r}; one of {', '.join(NLL_KINDS)}")
        if cls.monitor_mode not in ("min", "max"):
            raise TypeError(f"{cls.__name__}.monitor_mode={cls.monitor_mode!r}; min or max")

    @classmethod
    def check_data_kind(cls, data: DataSpec) -> None:
        """One-line refusal of data the family does not model (a constructor that reads `data.shape`
        before calling `super().__init__` calls this first)."""
        if cls.data_kinds is not None and data.kind not in cls.data_kinds:
            raise ConfigError(f"the {cls.family_name} family models {' or '.join(sorted(cls.data_kinds))}s; "
                              f"data {data.kind!r} is not supported")

    def __init__(self, cfg: ModelConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__()
        # Plain dataclasses, not OmegaConf nodes: a family reads its settings in every step (~0.3 ms a
        # step of DictConfig reads for a VAE).
        self.cfg = plain(cfg)
        self.optim_cfg = plain(optim)
        self.data_spec = data
        self.check_data_kind(data)
        self.fit_start_step: int | None = None  # set in on_train_start; None outside a Trainer's fit
        # Manual optimization (see `manual_update`); the runtime sets the first two.
        self.accumulate_grad_batches = 1
        self.gradient_clip_val: float | None = None
        self.manual_batches = 0  # training batches begun (the logging clock under manual optimization)
        self.micro_batches: list[int] = []  # per optimizer: micro-batches backpropagated
        self.optimizer_steps: list[int] = []  # per optimizer: steps taken
        self.stage1_source: dict[str, str] | None = None  # {"path", "sha256"} once load_stage1 has run
        self.frozen_stages: list[torch.nn.Module] = []  # kept in eval mode by `train`

    # ---- the named predictions; a family implements what it declares in `predictions` --------
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss and a dict of scalar diagnostics to log."""
        raise NotImplementedError

    def nll(self, x: Tensor, y: Tensor | None = None, k: int | None = None) -> Tensor:
        """Per-example negative log-likelihood of the discrete data in nats, [B] (or its bound, per
        `nll_kind`). `k`: importance samples for the kinds in IMPORTANCE_SAMPLED (None = the family's
        default); other families ignore it."""
        raise NotImplementedError(f"{self.family_name} has no likelihood")

    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        """n samples in data space (uint8 images; float or codes for audio). The family decides on
        `torch.no_grad` itself: a Langevin sampler needs gradients, so callers never force it."""
        raise NotImplementedError(f"{self.family_name} cannot sample")

    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Features [B, D] for downstream probes."""
        raise NotImplementedError(f"{self.family_name} has no encoder")

    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Reconstructions in data space, for families with an encoder and a decoder."""
        raise NotImplementedError(f"{self.family_name} does not reconstruct")

    def classify(self, x: Tensor) -> Tensor:
        """log p(y | x), [B, C]."""
        raise NotImplementedError(f"{self.family_name} has no classifier")

    def energy(self, x: Tensor) -> Tensor:
        """Unnormalized energy E(x), [B] (p(x) proportional to exp(-E(x)))."""
        raise NotImplementedError(f"{self.family_name} has no energy")

    def complete(self, x: Tensor, observed: Tensor, y: Tensor | None = None) -> Tensor:
        """x with its unobserved entries (`observed` False, same shape as x) filled in by the model."""
        raise NotImplementedError(f"{self.family_name} cannot complete partial data")

    def velocity(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The ODE field dx/dt at x [B, C, H, W] in the continuous image domain [-1, 1] (the range of
        `dataspec.images_to_unit`) and times t [B] in [0, 1]: t = 0 is the prior N(0, I), t = 1 the data.
        Differentiable in x (no `torch.no_grad` inside: the likelihood takes its divergence by autograd),
        rows independent, no host reads. The evaluation runner's `bpd_ode` integrates it."""
        raise NotImplementedError(f"{self.family_name} has no velocity field")

    def extra_figures(self, x: Tensor, y: Tensor) -> dict[str, tuple[Tensor, int]]:
        """Family-specific figures eval writes beside the report: {name: (uint8 images [N, C, H, W], images
        per row)} from a few test examples x, y (e.g. M2's analogies). Default: none."""
        return {}

    def condition(self, batch: dict[str, Tensor]) -> Tensor | None:
        """The `y` that `nll` and `sample` take for this batch (the label; a family conditioned on
        something else, e.g. WaveNet's speaker, returns that)."""
        return batch.get("y")

    # ---- per-rank state ----------------------------------------------------------------------
    def rank_state(self) -> dict[str, Any]:
        """State of this rank that is not in the (replicated) state dict: tensors and plain data."""
        return {}

    def load_rank_state(self, state: dict[str, Any], saved_world_size: int, world_size: int) -> None:
        """Restore `rank_state()`. With equal world sizes `state` is this rank's own saved state;
        otherwise it is {saved rank: state} of every saved rank, for a family that can re-deal it.
        This default refuses a different world size when there was state to restore."""
        if saved_world_size != world_size and any(state.values()):
            raise UserError(f"the checkpoint holds per-rank state of {saved_world_size} ranks and this run "
                            f"has {world_size}; the {self.family_name} family cannot re-deal it: resume with "
                            f"{saved_world_size} processes")

    # ---- stages ------------------------------------------------------------------------------
    def load_stage1(self) -> GenerativeModel:
        """The first-stage model named by `self.cfg.stage1` (a checkpoint file or run folder), frozen and
        in eval mode, through the one checkpoint reader (EMA weights where it has them).

        Its path and sha256 are kept in `stage1_source` and saved in this model's checkpoints (and
        releases); `load_model` / `load_release_model` refuse a second stage whose first stage has
        changed since."""
        source = getattr(self.cfg, "stage1", None)
        if not source:
            raise UserError(f"the {self.family_name} family needs model.stage1 (a first-stage checkpoint "
                            "or run folder)")
        path = resolve_checkpoint(source)
        digest = checkpoint_sha256(path)
        first, _ = load_model(path)
        first.requires_grad_(False)
        self.stage1_source = {"path": str(path), "sha256": digest}
        self.frozen_stages.append(first)
        return first

    def train(self, mode: bool = True) -> GenerativeModel:
        """As nn.Module.train, except that frozen first stages stay in eval mode (Lightning calls
        `train()` on the whole module when fitting starts and after each validation)."""
        super().train(mode)
        for stage in self.frozen_stages:
            stage.eval()
        return self

    # ---- Lightning plumbing -----------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, logs = self.loss(batch)
        if self.logs_this_step():
            self.log("train/loss", loss, batch_size=len(batch["x"]))
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=len(batch["x"]))
        return loss

    def logs_this_step(self) -> bool:
        """Whether to log this training step's scalars: on the steps the Trainer's loggers write (every
        `trainer.log_every_n_steps`, as Lightning counts them), on the first step of each fit and on
        the last of `max_steps`. True outside a Trainer's fit.

        Training-step values are logged `on_step` only, so on the other steps Lightning would store them
        and drop them unread, and each `self.log` costs Python bookkeeping comparable to a small
        network's forward pass (docs/benchmarks.md). The first step puts every `train/*` key into
        `trainer.callback_metrics` (a checkpoint monitoring one finds it)."""
        if self.fit_start_step is None:
            return True
        trainer = self.trainer
        # Lightning's loggers write when (optimizer-stepping batches so far + 1) % log_every_n_steps == 0;
        # that count is global_step under automatic optimization and the batch count under manual.
        step = trainer.global_step if self.automatic_optimization else self.manual_batches - 1
        every = trainer.log_every_n_steps
        return (step == self.fit_start_step or 0 < trainer.max_steps <= trainer.global_step + 1
                or trainer.should_stop or (every > 0 and (step + 1) % every == 0))

    def on_train_start(self) -> None:
        # Where this fit starts (after a resume too), on the clock `logs_this_step` uses.
        self.fit_start_step = self.trainer.global_step if self.automatic_optimization else self.manual_batches

    def on_train_end(self) -> None:
        self.fit_start_step = None

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, logs = self.loss(batch)
        n = len(batch["x"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, sync_dist=True, batch_size=n)
        if "nll" in self.predictions:
            nll = self.nll(batch["x"], self.condition(batch))
            self.log("val/bpd", nats_to_bpd(nll.mean(), self.data_spec.dims), sync_dist=True, batch_size=n)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.automatic_optimization:
            checkpoint["manual_optimization"] = {"batches": self.manual_batches, "micro_batches": self.micro_batches,
                                                 "optimizer_steps": self.optimizer_steps}
        if self.stage1_source is not None:
            checkpoint["stage1"] = dict(self.stage1_source)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("manual_optimization")
        if counters is not None:
            self.manual_batches = int(counters["batches"])
            self.micro_batches = [int(c) for c in counters["micro_batches"]]
            self.optimizer_steps = [int(c) for c in counters["optimizer_steps"]]

    def configure_optimizers(self) -> Any:
        return self.build_optimizer(self.parameters(), self.total_steps())

    def build_optimizer(self, params: Any, total_steps: int, lr: float | None = None) -> dict[str, Any]:
        """The recipe's optimizer and LR schedule for `params`; every family builds its optimizers here."""
        # The fused CPU kernel, except where Lightning refuses it: clipping gradients under mixed precision.
        trainer = self.attached_trainer()
        clips = trainer is not None and bool(trainer.gradient_clip_val or self.gradient_clip_val)
        fuse = not (clips and "mixed" in str(trainer.precision))
        return build_optimizer(params, self.optim_cfg, total_steps, lr=lr, fuse_on_cpu=fuse)

    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer this module is attached to, or None (`LightningModule.trainer` raises outside one)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def total_steps(self) -> int:
        """Optimizer steps the run will take (for LR schedules); 0 when unknown."""
        trainer = self.attached_trainer()
        if trainer is None:
            return 0
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            return int(trainer.estimated_stepping_batches)
        except Exception:  # no dataloader length to estimate from (an iterable of unknown size)
            return 0

    # ---- manual optimization: the one mechanism for families that step their own optimizers ----
    def configure_manual_optimization(self, accumulate_grad_batches: int = 1,
                                      gradient_clip_val: float | None = None) -> None:
        """The runtime's one call for a family with `automatic_optimization = False`: Lightning rejects
        Trainer-level accumulation and clipping then, so `manual_update` does them."""
        if accumulate_grad_batches < 1:
            raise UserError(f"trainer.accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        self.gradient_clip_val = gradient_clip_val

    def manual_update(self, index: int, closure: Callable[[], Tensor]) -> tuple[Tensor, bool]:
        """One micro-batch for optimizer `index` (in `configure_optimizers` order); returns (the detached
        loss, whether the optimizer stepped).

        `closure()` computes the loss with only this optimizer's parameters trainable
        (`toggle_optimizer`: the others get no gradient and, under DDP, are not reduced);
        `manual_backward(loss / accumulate_grad_batches)` (scaled under 16-bit mixed precision). After
        `accumulate_grad_batches` micro-batches of this optimizer it steps (Lightning unscales first;
        `on_before_optimizer_step` clips the global gradient norm), zeroes its gradients and steps
        its LR schedule. The counters are checkpointed, so a resume continues mid-accumulation."""
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = [] if schedulers is None else schedulers if isinstance(schedulers, list) else [schedulers]
        if len(self.micro_batches) != len(optimizers):
            self.micro_batches = [0] * len(optimizers)
            self.optimizer_steps = [0] * len(optimizers)
        optimizer = optimizers[index]
        self.toggle_optimizer(optimizer)
        loss = closure()
        self.manual_backward(loss / self.accumulate_grad_batches)
        self.micro_batches[index] += 1
        stepped = self.micro_batches[index] % self.accumulate_grad_batches == 0
        if stepped:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if index < len(schedulers):
                schedulers[index].step()
            self.optimizer_steps[index] += 1
        self.untoggle_optimizer(optimizer)
        return loss.detach(), stepped

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Counted at the start (Lightning runs callbacks' batch-end hooks, a preemption checkpoint among
        # them, before the module's): a checkpoint taken at a batch's end then includes that batch.
        if not self.automatic_optimization:
            self.manual_batches += 1
        if "skipped" in batch and self.logs_this_step():  # running totals: the logged steps suffice
            # What the data pipeline did (docs/data.md, "Bad data"): bad samples this rank skipped, and the
            # good samples that stood in for them. Here, not in a callback: every callback costs each step.
            self.log("data/skipped_samples", float(batch["skipped"]), reduce_fx="max", batch_size=1)
            if "replaced" in batch:
                self.log("data/replacement_samples", float(batch["replaced"]), reduce_fx="max", batch_size=1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.automatic_optimization and self.gradient_clip_val:  # the Trainer clips automatic ones
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")

    def setup(self, stage: str) -> None:
        trainer = self.attached_trainer()
        if (trainer is not None and not self.automatic_optimization
                and isinstance(trainer.strategy, DeepSpeedStrategy)):
            raise UserError(f"the {self.family_name} family optimizes manually, which Lightning's DeepSpeed "
                            "strategy does not support; use trainer.strategy=ddp or fsdp")
