"""Finding, reading and loading checkpoints: the one checkpoint reader.

The CLI, eval, hub and the families (a second stage loads its first stage here) all read checkpoints
through `read_checkpoint` / `load_model`. Models are built through the registry, never by importing a
family, so this module sits below the families in the layers (docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from scalegen.config.loader import config_from_container
from scalegen.dataspec import DataSpec
from scalegen.distributed.deepspeed import consolidate_zero_checkpoint, is_zero_checkpoint, zero_client_state
from scalegen.errors import UserError
from scalegen.fetch import sha256_file
from scalegen.registry import get_family


def newest_checkpoint(run_dir: Path) -> Path | None:
    """last.ckpt if present, else the most recently written checkpoint in run_dir/checkpoints.

    A checkpoint is a file, or a folder when DeepSpeed wrote it sharded (ZeRO)."""
    folder = Path(run_dir) / "checkpoints"
    if (folder / "last.ckpt").exists():
        return folder / "last.ckpt"
    ckpts = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint a user means by `path`: a checkpoint file, a ZeRO checkpoint folder, or a run folder
    (its newest checkpoint); a clear error otherwise."""
    given = path = Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run folder
        found = newest_checkpoint(path)
        if found is None:
            raise UserError(f"run folder {path} has no checkpoint yet; train it first")
        path = found
    if path.is_file() or is_zero_checkpoint(path):
        return path
    if not path.exists():
        raise UserError(f"checkpoint {given} does not exist")
    raise UserError(f"{given} is neither a checkpoint (file or ZeRO folder) nor a run folder with checkpoints")


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file; for a ZeRO folder, of its files' names and sha256s in sorted order."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    lines = [f"{sha256_file(f)}  {f.relative_to(path)}" for f in sorted(path.rglob("*")) if f.is_file()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict (state_dict, ema_state_dict, the scalegen config...) of a checkpoint file, a ZeRO
    folder (weights consolidated to fp32 through DeepSpeed's utilities) or a run folder's newest checkpoint.

    Files load without executing pickled code (tensors and plain containers only)."""
    path = resolve_checkpoint(path)
    if is_zero_checkpoint(path):
        ckpt = zero_client_state(path)
        ckpt["state_dict"] = consolidate_zero_checkpoint(path)
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "scalegen" not in ckpt:
        raise UserError(f"{path} is not a scalegen checkpoint (no config inside)")
    return ckpt


def load_model(path: str | Path, use_ema: bool = True) -> tuple[Any, DictConfig]:
    """(model in eval mode, its typed config) from a checkpoint or run folder alone.

    With use_ema and EMA weights in the checkpoint, the averaged weights are loaded. A second-stage
    model rebuilds its first stage from the path in its config; the sha256 recorded in the checkpoint
    must match it (the weights themselves then come from this checkpoint)."""
    ckpt = read_checkpoint(path)
    cfg = config_from_container(ckpt["scalegen"]["config"])
    spec_fields = dict(ckpt["scalegen"]["data_spec"])
    spec_fields["shape"] = tuple(spec_fields["shape"])
    spec = DataSpec(**spec_fields)
    model = get_family(cfg.model.family).module(cfg.model, cfg.optim, spec)
    weights = ckpt["ema_state_dict"] if use_ema and "ema_state_dict" in ckpt else ckpt["state_dict"]
    recorded = ckpt.get("stage1")
    if recorded is not None:
        found = (model.stage1_source or {}).get("sha256")
        if found != recorded["sha256"]:
            raise UserError(f"{path}: its first stage {recorded['path']} had sha256 {recorded['sha256'][:12]}..., "
                            f"the model.stage1 found now has {str(found)[:12]}...; restore that checkpoint")
    model.load_state_dict(weights)
    model.eval()
    return model, cfg


def temporary_path(path: Path, pid: int | None = None) -> Path:
    """Where a file is written before the rename: beside it, named by host and process (this one unless
    `pid`), so a later start can tell a stale one (its writer was killed) from one being written."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid() if pid is None else pid}")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to `temporary_path(path)`, fsync, then rename over `path`: a reader (or a crash) sees the
    old file or the whole new one. Written through a Python file object, so a full disk raises
    OSError(ENOSPC) (torch's own file writer raises a RuntimeError without the errno); the temporary is
    removed whatever happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
