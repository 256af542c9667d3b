"""`scalegen release RUN_DIR --out DIR`: a self-contained release of a trained run.

    DIR/
      model.safetensors        raw weights (keys of model.state_dict())
      model_ema.safetensors    EMA weights, when the run kept an average
      config.yaml              the resolved recipe the run trained with
      data_spec.json           what the model expects (shape, classes, levels)
      metrics.json             the evaluation report's metrics, when the run has one
      release.json             format version, family, provenance, file list
      README.md                the model card
      SHA256SUMS               sha256 of every file above (`sha256sum -c SHA256SUMS`)

Nothing in a release is a pickle: weights are safetensors, the rest is text.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf

import scalegen
from scalegen.checkpoints import read_checkpoint, resolve_checkpoint
from scalegen.errors import UserError
from scalegen.hub.card import model_card
from scalegen.hub.checksums import SUMS, write_sums

FORMAT = 1
WEIGHTS, EMA_WEIGHTS = "model.safetensors", "model_ema.safetensors"


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: one contiguous copy per tensor.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _find_metrics(run_dir: Path) -> Path | None:
    """The newest evaluation report's metrics.json in the run folder, if any."""
    if not run_dir.is_dir():
        return None
    found = sorted(run_dir.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def make_release(
    run_dir: str | Path, out: str | Path, licence: str = "Apache-2.0", overwrite: bool = False
) -> Path:
    """Write the release of `run_dir` (or of one checkpoint) into `out`; returns `out`."""
    from safetensors.torch import save_file  # only when writing a release

    run_dir, out = Path(run_dir), Path(out)
    ckpt_path = resolve_checkpoint(run_dir)
    ckpt = read_checkpoint(ckpt_path)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = ckpt["scalegen"]
    config = meta["config"]
    files = [WEIGHTS, "config.yaml", "data_spec.json", "release.json", "README.md"]
    save_file(_plain(ckpt["state_dict"]), str(out / WEIGHTS), metadata={"format": "pt", "kind": "raw"})
    has_ema = bool(ckpt.get("ema_state_dict"))
    if has_ema:
        save_file(
            _plain(ckpt["ema_state_dict"]), str(out / EMA_WEIGHTS), metadata={"format": "pt", "kind": "ema"}
        )
        files.append(EMA_WEIGHTS)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    spec = meta["data_spec"]
    spec = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(spec)
    (out / "data_spec.json").write_text(json.dumps(spec, indent=2, default=list) + "\n")
    metrics = None
    run_folder = (
        run_dir if run_dir.is_dir() and (run_dir / "checkpoints").is_dir() else ckpt_path.parent.parent
    )
    metrics_path = _find_metrics(run_folder)
    if metrics_path is not None:
        metrics = json.loads(metrics_path.read_text())
        shutil.copyfile(metrics_path, out / "metrics.json")
        files.append("metrics.json")
    info = {
        "format": FORMAT,
        "scalegen_version": scalegen.__version__,
        "family": config["model"]["family"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_checkpoint": str(ckpt_path),
        "global_step": int(ckpt.get("global_step", 0)),
        "weights": WEIGHTS,
        "ema_weights": EMA_WEIGHTS if has_ema else None,
        "licence": licence,
        "files": sorted(files),
        # A second stage: its first stage's weights are in the weights files (`stage1.*`); this names the
        # first-stage checkpoint the config points at and its sha256, checked when the release is loaded.
        "stage1": ckpt.get("stage1"),
    }
    (out / "release.json").write_text(json.dumps(info, indent=2) + "\n")

    (out / "README.md").write_text(model_card(config, spec, info, metrics))
    write_sums(out, files)
    return out


__all__ = ["EMA_WEIGHTS", "FORMAT", "SUMS", "WEIGHTS", "make_release"]
