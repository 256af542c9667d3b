"""Post-hoc EMA (Karras et al. 2024, EDM2, sec. 3): power-function EMAs snapshotted during training, the
average of any other width reconstructed afterwards (`scalegen ema RUN --sigma-rel S`).

During training `PostHocEMA` keeps one power-function EMA per `ema.posthoc.sigma_rels` (EDM2: 0.05 and
0.10), each an `EMAState` with its exponent gamma, so sharding is handled as for the plain EMA: under
DDP and ZeRO-1/2 every rank holds the same averages and rank 0 writes the snapshots; under ZeRO-3 the
parameters are gathered once per step for all averages (`update_averages`) and only rank 0 keeps them,
at the cost of one whole fp32 copy of the weights per sigma_rel on rank 0 (in CPU memory with
`ema.update_on_cpu`); the other ranks hold nothing extra. (DeepSpeed's documented
`safe_get_local_fp32_param` gives a rank's fp32 partition, but not where that partition sits in the whole
tensor, so shards written that way could not be consolidated offline through documented API.)

Every `snapshot_every_n_steps` optimizer steps, and at the end of training, rank 0 writes
`{dir}/step-XXXXXXXXX.pt` atomically: {"step", "profiles": [{"sigma_rel", "gamma", "state_dict"}]}, the
averages keyed like `model.state_dict()`. The averages and their step counts are in every checkpoint (the
callback's state), so a resumed run continues the same averages.

`reconstruct(folder, sigma_rel)` solves for the combination of the snapshots whose profile best fits the
requested one at the last snapshot's step (`scalegen.ema_profiles.solve_weights`) and sums them, one
snapshot file in memory at a time.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from scalegen.callbacks.ema import EMAState, update_averages
from scalegen.ema_profiles import MAX_SIGMA_REL, sigma_rel_to_gamma, solve_weights
from scalegen.errors import UserError

SNAPSHOT_GLOB = "step-*.pt"


def snapshot_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:09d}.pt"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename it over: a reader sees the old file or the
    whole new one (named like the runtime's checkpoint temporaries, so a stale one is recognizable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class PostHocEMA(L.Callback):
    """Lightning callback: power-function EMAs of the weights and their periodic snapshots."""

    def __init__(
        self,
        folder: str | Path,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        every_n_steps: int = 1000,
        on_cpu: bool = False,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"snapshot every_n_steps must be >= 1, got {every_n_steps}")
        self.folder, self.every_n_steps = Path(folder), every_n_steps
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.states = [EMAState(gamma=sigma_rel_to_gamma(s), on_cpu=on_cpu) for s in self.sigma_rels]
        self.last_snapshot = 0
        self._pending: list[dict[str, Tensor]] | None = None  # averages from a checkpoint, applied at start

    @classmethod
    def from_config(cls, ema_cfg: Any, run_dir: str | Path) -> PostHocEMA:
        p = ema_cfg.posthoc
        folder = Path(p.dir) if p.dir else Path(run_dir) / "ema_snapshots"
        return cls(folder, list(p.sigma_rels), p.snapshot_every_n_steps, ema_cfg.update_on_cpu)

    @property
    def state_key(self) -> str:
        # Two of these callbacks (other profiles) may run side by side.
        return f"PostHocEMA{{sigma_rels={self.sigma_rels}}}"

    @staticmethod
    def _root(trainer: L.Trainer) -> Any:
        return getattr(trainer.strategy, "model", None)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_fit_start: under DeepSpeed the checkpoint is restored after on_fit_start.
        if self._pending is not None:
            if EMAState.owns(pl_module):
                for state, weights in zip(self.states, self._pending):
                    device = "cpu" if state.on_cpu else pl_module.device
                    state.shadow = {k: v.to(device) for k, v in weights.items()}
            self._pending = None
        elif not self.states[0].shadow:
            for state in self.states:  # the start value is never used: the first update has beta = 0
                state.init_from(pl_module, self._root(trainer))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps: accumulation micro-batches do not update
        updated = update_averages(self.states, pl_module, step, self._root(trainer))
        # At each multiple of the interval, or the first step past one (steps that jump, e.g. two optimizers).
        if updated and step // self.every_n_steps > self.last_snapshot // self.every_n_steps:
            self.write_snapshot(step, trainer.is_global_zero)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = self.states[0].last_step
        if step > self.last_snapshot:  # the final weights' averages, whatever the snapshot interval
            self.write_snapshot(step, trainer.is_global_zero)

    def write_snapshot(self, step: int, global_zero: bool) -> None:
        """Every rank calls this; global rank 0 writes (under DDP the averages are the same everywhere, under
        ZeRO-3 only rank 0 has them)."""
        self.last_snapshot = step
        if not global_zero or not self.states[0].shadow:
            return
        profiles = [
            {"sigma_rel": s, "gamma": st.gamma, "state_dict": st.weights()}
            for s, st in zip(self.sigma_rels, self.states)
        ]
        atomic_save({"step": step, "profiles": profiles}, snapshot_path(self.folder, step))

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "sigma_rels": self.sigma_rels,
            "states": [st.state_dict() for st in self.states],
            "weights": [st.weights() for st in self.states],  # {} on ranks that do not own them (ZeRO-3)
            "last_snapshot": self.last_snapshot,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for st, saved in zip(self.states, state_dict["states"]):
            st.load_state_dict(saved)
        self.last_snapshot = int(state_dict["last_snapshot"])
        weights = state_dict["weights"]
        self._pending = [dict(w) for w in weights] if weights and weights[0] else None


# ---- after training: reconstruction ------------------------------------------------------------------
def list_snapshots(folder: str | Path) -> list[dict[str, Any]]:
    """One entry per (snapshot file, profile): {"path", "index", "step", "sigma_rel", "gamma"}, by step.
    Files are memory-mapped: only the small metadata is read."""
    folder = Path(folder)
    files = sorted(folder.glob(SNAPSHOT_GLOB)) if folder.is_dir() else []
    if not files:
        raise UserError(f"no post-hoc EMA snapshots in {folder}; train with ema.posthoc.enabled=true (or point "
                        "--snapshots at the folder ema.posthoc.dir named)")
    out = []
    for path in files:
        snap = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for i, prof in enumerate(snap["profiles"]):
            out.append({"path": path, "index": i, "step": int(snap["step"]), "sigma_rel": float(prof["sigma_rel"]),
                        "gamma": float(prof["gamma"])})
    return sorted(out, key=lambda e: (e["step"], e["index"]))


def representable_range(entries: list[dict[str, Any]], max_error: float, step: int) -> tuple[float, float] | None:
    """The sigma_rel interval (on a grid) that `entries` reconstruct at `step` within `max_error`."""
    grid = np.linspace(0.005, MAX_SIGMA_REL, 56)
    steps, gammas = [e["step"] for e in entries], [e["gamma"] for e in entries]
    ok = [s for s in grid if solve_weights(steps, gammas, step, sigma_rel_to_gamma(float(s)))[1] <= max_error]
    return (float(min(ok)), float(max(ok))) if ok else None


def solve(entries: list[dict[str, Any]], sigma_rel: float, max_error: float) -> tuple[np.ndarray, float, int]:
    """(coefficients over `entries`, relative profile error, step) of sigma_rel at the last snapshot's step;
    a UserError when sigma_rel is out of range or the snapshots cannot represent it within max_error."""
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise UserError(f"--sigma-rel {sigma_rel} is out of range: must be in (0, {MAX_SIGMA_REL:.4f}] (the "
                        "profile's std relative to the training length; EDM2's best are about 0.02-0.2)")
    step = max(e["step"] for e in entries)
    x, err = solve_weights([e["step"] for e in entries], [e["gamma"] for e in entries], step,
                           sigma_rel_to_gamma(sigma_rel))
    if err > max_error:
        span = representable_range(entries, max_error, step)
        where = f"they represent about {span[0]:.3f}-{span[1]:.3f}" if span else "they represent none"
        raise UserError(
            f"--sigma-rel {sigma_rel:g} cannot be reconstructed from the {len(entries)} snapshot profiles (profile "
            f"error {err:.1%} > --max-profile-error {max_error:.1%}); {where}: choose a sigma_rel there, or train "
            "with more snapshots (smaller ema.posthoc.snapshot_every_n_steps)"
        )
    return x, err, step


@torch.no_grad()
def combine(entries: list[dict[str, Any]], coefficients: np.ndarray) -> dict[str, Tensor]:
    """sum_k x_k * snapshot_k, accumulated in float64 one file at a time; integer tensors (counters) from
    the newest snapshot. Keys and dtypes as in the snapshots."""
    total: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    by_file: dict[Path, list[tuple[int, float]]] = {}
    for e, x in zip(entries, coefficients):
        by_file.setdefault(e["path"], []).append((e["index"], float(x)))
    newest = max(entries, key=lambda e: e["step"])
    for path, items in by_file.items():
        profiles = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["profiles"]
        for index, x in items:
            for k, v in profiles[index]["state_dict"].items():
                if not v.is_floating_point():
                    continue
                dtypes[k] = v.dtype
                acc = total.setdefault(k, torch.zeros(v.shape, dtype=torch.float64))
                acc.add_(v.to(torch.float64), alpha=x)
    last = torch.load(newest["path"], map_location="cpu", weights_only=True, mmap=True)["profiles"][newest["index"]]
    out = {}
    for k, v in last["state_dict"].items():
        out[k] = total[k].to(dtypes[k]) if k in total else v.clone()
    return out


def reconstruct(folder: str | Path, sigma_rel: float, max_error: float = 0.1) -> tuple[dict[str, Tensor], dict]:
    """The EMA of width `sigma_rel` at the last snapshot's step from the snapshots in `folder`, and a record
    of how it was made ({"sigma_rel", "gamma", "step", "profile_error", "snapshots": [[step, sigma_rel,
    coefficient], ...]})."""
    entries = list_snapshots(folder)
    x, err, step = solve(entries, sigma_rel, max_error)
    info = {
        "sigma_rel": float(sigma_rel),
        "gamma": sigma_rel_to_gamma(sigma_rel),
        "step": step,
        "profile_error": err,
        "snapshots": [[e["step"], e["sigma_rel"], float(c)] for e, c in zip(entries, x)],
    }
    return combine(entries, x), info
