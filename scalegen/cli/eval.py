"""`scalegen eval CKPT --out DIR`: every metric for one checkpoint, split across ranks under torchrun.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from scalegen.checkpoints import checkpoint_sha256, load_model, resolve_checkpoint
from scalegen.config.loader import apply_overrides
from scalegen.eval.data import EvalData
from scalegen.eval.dist import rank_world
from scalegen.eval.runner import evaluate, parse_metrics

HELP = "evaluate a checkpoint: bits/dim, FID/KID/IS, linear and semi-supervised probes, with a report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .ckpt file or a run folder (its newest checkpoint)")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated subset of bpd,bpd_ode,fid,kid,is,linear_probe,semisup,inference_gap "
                             "(default: the checkpoint's eval.metrics, else all the family supports)")
    parser.add_argument("--data", default=None, metavar="ROOT",
                        help="folder (or URL) of the shards + manifest.json to evaluate on "
                             "(default: the checkpoint's data.root)")
    parser.add_argument("--num-samples", type=int, default=None, help="generated samples for FID/KID/IS")
    parser.add_argument("--out", required=True, help="output folder for metrics.json, report.md and figures")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--raw", action="store_true", help="use the raw weights, not the EMA average")
    parser.add_argument("--no-wandb", action="store_true",
                        help="do not log to the run's W&B run (default: log when the run used W&B)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. eval.iwae_k=100 eval.max_examples=1000")


def _init_distributed() -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); work is then split across ranks."""

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def _resume_wandb(cfg, run_dir: Path | None):
    """Continue the training run's W&B run (same id, same mode) so the evaluation lands next to it."""
    if run_dir is None or not cfg.logging.wandb or cfg.logging.mode == "disabled" or not cfg.eval.log_wandb:
        return None
    id_file = run_dir / "wandb_run_id"
    if not id_file.is_file():
        return None
    import wandb  # heavy: only when the run used W&B

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=cfg.logging.project, entity=cfg.logging.entity, id=id_file.read_text().strip(),
                      resume="allow", mode=cfg.logging.mode, dir=str(run_dir), job_type="eval")


def run(args: argparse.Namespace) -> int:


    _init_distributed()
    ckpt = resolve_checkpoint(args.checkpoint)
    model, cfg = load_model(ckpt, use_ema=not args.raw)
    cfg = apply_overrides(cfg, args.overrides)
    if args.data:
        cfg.data.root, cfg.data.train, cfg.data.val, cfg.data.test = args.data, "", "", ""
    if args.num_samples is not None:
        cfg.eval.num_samples = args.num_samples
    metrics = parse_metrics(args.metrics if args.metrics is not None else list(cfg.eval.metrics), model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and rank_world()[1] > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    model = model.to(device)
    data = EvalData.from_config(cfg.data)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    wandb_run = None if args.no_wandb or rank_world()[0] != 0 else _resume_wandb(cfg, run_dir)
    try:
        results = evaluate(
            model, cfg.eval, data, Path(args.out), metrics=metrics,
            checkpoint={"path": str(ckpt.resolve()), "sha256": checkpoint_sha256(ckpt), "ema": not args.raw},
            run_dir=run_dir, step=None, config=OmegaConf.to_container(cfg, resolve=True),
        )
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    if rank_world()[0] == 0:
        for key, value in results["summary"].items():
            print(f"{key}: {value:.6g}")
        print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'report.md'}")
    return 0
