"""`train(cfg)`: one run from a validated config. The only training loop is Lightning's."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger  # (wandb itself is imported only when a run starts)
from omegaconf import DictConfig, OmegaConf

import scalegen.families  # noqa: F401  (registers the built-in families)
from scalegen.callbacks.compile import CompileNetworks
from scalegen.callbacks.data_audit import DataAudit
from scalegen.callbacks.ema import EMA
from scalegen.callbacks.figures import RunFigures
from scalegen.callbacks.periodic_eval import PeriodicEval
from scalegen.callbacks.posthoc_ema import PostHocEMA
from scalegen.callbacks.progress import ProgressBar
from scalegen.checkpoints import newest_checkpoint
from scalegen.config.loader import resolved, run_dir_of
from scalegen.data import build_datamodule
from scalegen.distributed import scaled_optim
from scalegen.distributed import trainer_kwargs as distributed_kwargs
from scalegen.distributed.batching import world_size
from scalegen.distributed.deepspeed import check_zero_resume, is_zero_checkpoint
from scalegen.errors import UserError
from scalegen.hub import init_from_release
from scalegen.registry import get_family
from scalegen.runtime.checkpoint import (
    AtomicCheckpointIO,
    CheckpointWriting,
    check_resume_recipe,
    remove_stale_temporaries,
)
from scalegen.runtime.metrics_file import JsonLinesLogger
from scalegen.runtime.preemption import Preemption


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    mode = cfg.trainer.resume
    if mode == "never":
        return None
    if mode == "auto":
        found = newest_checkpoint(run_dir)
        return str(found) if found else None
    if not (Path(mode).is_file() or is_zero_checkpoint(mode)):
        raise UserError(
            f"trainer.resume={mode!r}: no such checkpoint (use auto, never, a checkpoint file or a ZeRO "
            "checkpoint folder)"
        )
    return mode


def _wandb_logger(cfg: DictConfig, run_dir: Path) -> Any:
    """W&B through Lightning, offline by default. The run id is kept in the run folder so a resumed or
    requeued job continues the same W&B run."""
    id_file = run_dir / "wandb_run_id"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(project=cfg.logging.project, entity=cfg.logging.entity, name=cfg.run.name,
                       save_dir=str(run_dir), id=id_file.read_text().strip(), resume="allow",
                       mode=cfg.logging.mode, tags=list(cfg.logging.tags),
                       config=OmegaConf.to_container(cfg, resolve=True))


def trainer_kwargs(cfg: DictConfig, family: type | None = None) -> dict[str, Any]:
    """Strategy, precision and accumulation for Lightning's Trainer (the family's DDP settings included)."""
    return distributed_kwargs(cfg.trainer, cfg.data.batch_size, family=family)


def ck_monitor(cfg: DictConfig, model: Any) -> str | None:
    """The metric that picks the best checkpoint: `checkpoint.monitor`, or the family's (`monitor`) when
    it is null; None = no best checkpoint (only last and periodic ones), as for a run that never validates
    (`trainer.limit_val_batches=0`) and a family whose monitor is a validation metric."""
    if cfg.checkpoint.monitor is not None:
        return str(cfg.checkpoint.monitor)
    monitor = model.monitor if model is not None else "val/loss"
    never_validates = cfg.trainer.limit_val_batches == 0
    return None if never_validates and monitor is not None and monitor.startswith("val/") else monitor


def ck_mode(cfg: DictConfig, model: Any) -> str:
    """`checkpoint.mode` for a monitor the recipe names; the family's `monitor_mode` for the family's."""
    if cfg.checkpoint.monitor is not None or model is None:
        return str(cfg.checkpoint.mode)
    return model.monitor_mode


def build_trainer(cfg: DictConfig, run_dir: Path, spec: Any, extra_callbacks: list | None = None,
                  model: Any = None) -> L.Trainer:
    t = cfg.trainer
    kwargs, clip = trainer_kwargs(cfg, type(model) if model is not None else None), t.gradient_clip_val
    if model is not None and not model.automatic_optimization:
        # Lightning rejects Trainer-level accumulation and clipping under manual optimization; the shared
        # mechanism in families/base.py (`manual_update`) does them instead.
        model.configure_manual_optimization(kwargs.get("accumulate_grad_batches", 1), clip)
        kwargs["accumulate_grad_batches"], clip = 1, None
    monitor = ck_monitor(cfg, model)
    metrics_file = run_dir / cfg.logging.metrics_file
    loggers: list[Any] = [JsonLinesLogger(metrics_file)]
    if cfg.logging.wandb and cfg.logging.mode != "disabled":
        loggers.append(_wandb_logger(cfg, run_dir))
    ck = cfg.checkpoint
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-{step}" if monitor else "step-{step}",
                        monitor=monitor, mode=ck_mode(cfg, model),
                        save_top_k=ck.save_top_k if monitor else 0,
                        save_last=ck.save_last,
                        every_n_train_steps=ck.every_n_train_steps, every_n_epochs=ck.every_n_epochs),
        CheckpointWriting(OmegaConf.to_container(resolved(cfg)), spec, Preemption(run_dir, str(t.requeue_signal))),
        RunFigures(run_dir, metrics_file, t.val_samples),
    ]
    if cfg.ema.enabled:
        callbacks.append(EMA.from_config(cfg.ema))
    if cfg.ema.posthoc.enabled:
        callbacks.append(PostHocEMA.from_config(cfg.ema, run_dir))
    if t.record_sample_keys:  # which samples each rank saw (the bad-sample counters are logged by the family)
        callbacks.append(DataAudit(run_dir))
    if cfg.eval.every_n_steps:
        callbacks.append(PeriodicEval(cfg))
    if t.compile:  # torch.compile the family's networks (scalegen/callbacks/compile.py)
        callbacks.append(CompileNetworks(t.compile_mode))
    if t.progress_bar:
        callbacks.append(ProgressBar())
    callbacks += extra_callbacks or []
    check_every_epoch = None if t.val_check_interval else t.check_val_every_n_epoch
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        max_steps=t.max_steps, max_epochs=t.max_epochs,
        gradient_clip_val=clip,
        val_check_interval=t.val_check_interval, check_val_every_n_epoch=check_every_epoch,
        limit_val_batches=t.limit_val_batches, num_sanity_val_steps=t.num_sanity_val_steps,
        log_every_n_steps=t.log_every_n_steps, deterministic=t.deterministic,
        enable_progress_bar=t.progress_bar, enable_model_summary=False,
        default_root_dir=str(run_dir), logger=loggers, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], **kwargs,
    )


def train(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> Path:
    """Train the recipe's family on its data; returns the run folder. `callbacks` are added to the defaults."""
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    family = get_family(cfg.model.family).module
    datamodule = build_datamodule(cfg.data, family.labelled_stream)
    spec = datamodule.spec
    model = family(cfg.model, scaled_optim(cfg), spec)
    if cfg.finetune.init_from:  # start from a release's weights (a resumed run then loads its checkpoint)
        init_from_release(model, cfg.finetune)
    # Refusals before the Trainer exists (building it may already refuse, e.g. ZeRO on a CPU).
    ckpt = _resume_path(cfg, run_dir)
    if ckpt is not None:
        check_resume_recipe(ckpt, OmegaConf.to_container(resolved(cfg)), list(cfg.trainer.resume_allow_changes))
        if is_zero_checkpoint(ckpt):
            check_zero_resume(ckpt, world_size(cfg.trainer))
    trainer = build_trainer(cfg, run_dir, spec, extra_callbacks=callbacks, model=model)
    remove_stale_temporaries(run_dir / "checkpoints")  # left by a save that was killed (this host's only)
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved(cfg)))
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
    if cfg.checkpoint.save_last and not trainer.interrupted:
        # ModelCheckpoint writes at epoch/validation ends; a run stopped by max_steps mid-epoch would
        # otherwise leave last.ckpt without its final steps.
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)  # a full one: it resumes
    # Lightning leaves the W&B run open after fit; a later train() in this process (a notebook, a sweep)
    # would then log into it instead of its own run.
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()
    return run_dir
