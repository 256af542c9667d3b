"""Post-hoc EMA (Karras et al. 2024, EDM2, sec. 3): power-function EMAs snapshotted during training, the
average of any other width reconstructed afterwards (`scalegen ema RUN --sigma-rel S`).

During training `PostHocEMA` keeps one power-function EMA per `ema.posthoc.sigma_rels` (EDM2: 0.05 and
0.10), each a sliced `EMAState` with its exponent gamma. Under DDP and ZeRO-1/2 every rank holds the same
whole averages and rank 0 writes the snapshots. Under ZeRO-3 the parameters are gathered once per step
for all averages (`update_averages`, whole on every rank for the update, as for a forward pass) and rank
r of W keeps only slice r of each flattened tensor (`torch.tensor_split(t.reshape(-1), W)[r]`): 1/W of
one fp32 copy of the weights per sigma_rel on each rank, none whole anywhere.

Every `snapshot_every_n_steps` optimizer steps, and at the end of training, the snapshot is written
atomically: {"step", "profiles": [{"sigma_rel", "gamma", "state_dict"}]}, the averages keyed like
`model.state_dict()`, by rank 0 to `{dir}/step-XXXXXXXXX.pt` when whole; under ZeRO-3 every rank writes
its slices to `{dir}/step-XXXXXXXXX.rank-RRR-of-WWW.pt`, with "rank", "world_size" and "shapes" (the whole
tensors' shapes) beside them. The averages (this rank's slices), the split and the step counts are the
callback's state in every checkpoint. Under ZeRO-3 DeepSpeed writes each rank's client state to its own
`zero_pp_rank_R_mp_rank_00_model_states.pt` and gives each rank its own file back, so every rank saves and
restores its own slices; a resume continues the same averages at the same world size (DeepSpeed loads
a ZeRO checkpoint only at that size; another is refused before the job starts, `check_zero_resume`).

`reconstruct(folder, sigma_rel)` solves for the combination of the snapshots whose profile best fits the
requested one at the last snapshot's step (`scalegen.ema_profiles.solve_weights`) and sums them in float64,
one snapshot file (or one shard) in memory at a time, adding each shard into its slice of the whole sum;
an incomplete set of shards is refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from scalegen.callbacks.ema import EMAState, update_averages
from scalegen.checkpoints import atomic_save
from scalegen.ema_profiles import MAX_SIGMA_REL, sigma_rel_to_gamma, solve_weights
from scalegen.errors import UserError

SNAPSHOT_GLOB = "step-*.pt"
SNAPSHOT_NAME = re.compile(r"step-(\d+)(?:\.rank-(\d+)-of-(\d+))?\.pt")


def snapshot_path(folder: Path, step: int, rank: int = 0, world: int = 1) -> Path:
    """The whole snapshot's file, or (world > 1) rank's shard of it."""
    shard = f".rank-{rank:03d}-of-{world:03d}" if world > 1 else ""
    return Path(folder) / f"step-{step:09d}{shard}.pt"


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
        self.states = [EMAState(gamma=sigma_rel_to_gamma(s), on_cpu=on_cpu, sliced=True) for s in self.sigma_rels]
        self.last_snapshot = 0
        self._pending: dict[str, Any] | None = None  # averages from a checkpoint (this rank's), applied at start

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
        self.start(pl_module, self._root(trainer))

    def start(self, module: torch.nn.Module, root: Any = None) -> None:
        """Continue the checkpoint's averages, or start new ones (all ranks call this together)."""
        pending, self._pending = self._pending, None
        if pending is None:
            if not self.states[0].shadow:
                for state in self.states:  # the start value is never used: the first update has beta = 0
                    state.init_from(module, root)
            return
        saved, split = tuple(pending["split"]), self.states[0].split_for(module)
        if saved != split:
            raise UserError(
                f"the checkpoint holds slice {saved[0]} of {saved[1]} of the post-hoc EMAs (one per ZeRO-3 rank) but "
                f"this process would keep slice {split[0]} of {split[1]}: resume with the strategy and world size "
                f"that wrote it ({saved[1]} processes; ZeRO checkpoints load only at that size)"
            )
        for state, weights in zip(self.states, pending["weights"]):
            device = "cpu" if state.on_cpu else next(module.parameters()).device
            state.split, state.shapes = split, {k: tuple(v) for k, v in pending["shapes"].items()}
            state.shadow = {k: v.clone().to(device) for k, v in weights.items()}

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
        """Every rank calls this. Whole averages (the same on every rank): global rank 0 writes them; slices
        (ZeRO-3): every rank writes its own shard."""
        self.last_snapshot = step
        first = self.states[0]
        rank, world = first.split
        if (world == 1 and not global_zero) or not first.shadow:
            return
        profiles = [
            {"sigma_rel": s, "gamma": st.gamma, "state_dict": st.weights()}
            for s, st in zip(self.sigma_rels, self.states)
        ]
        shard = {"rank": rank, "world_size": world, "shapes": self._shapes()} if world > 1 else {}
        atomic_save({"step": step, **shard, "profiles": profiles}, snapshot_path(self.folder, step, rank, world))

    def _shapes(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.states[0].shapes.items()}

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "sigma_rels": self.sigma_rels,
            "states": [st.state_dict() for st in self.states],
            # This rank's slices under ZeRO-3, where each rank's checkpoint file holds its own; whole otherwise.
            "weights": [st.weights() for st in self.states],
            "split": list(self.states[0].split),
            "shapes": self._shapes(),
            "last_snapshot": self.last_snapshot,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for st, saved in zip(self.states, state_dict["states"]):
            st.load_state_dict(saved)
        self.last_snapshot = int(state_dict["last_snapshot"])
        weights = state_dict["weights"]
        if not (weights and weights[0]):
            self._pending = None
            return
        shapes = state_dict.get("shapes") or {k: list(v.shape) for k, v in weights[0].items()}
        self._pending = {"weights": [dict(w) for w in weights], "split": state_dict.get("split", [0, 1]),
                         "shapes": shapes}


# ---- after training: reconstruction ------------------------------------------------------------------
def snapshot_files(folder: Path) -> dict[int, list[Path]]:
    """step -> its file, or its shards in rank order; a UserError for a step whose shards are incomplete."""
    by_step: dict[int, dict[tuple[int, int], Path]] = {}
    for path in sorted(folder.glob(SNAPSHOT_GLOB)) if folder.is_dir() else []:
        m = SNAPSHOT_NAME.fullmatch(path.name)
        if m:
            rank, world = (int(m[2]), int(m[3])) if m[2] else (0, 1)
            by_step.setdefault(int(m[1]), {})[rank, world] = path
    out = {}
    for step, parts in sorted(by_step.items()):
        worlds = sorted({w for _, w in parts})
        world = worlds[-1]
        missing = [snapshot_path(folder, step, r, world).name for r in range(world) if (r, world) not in parts]
        if len(worlds) > 1 or missing:
            raise UserError(
                f"post-hoc EMA snapshot {step} in {folder} is incomplete ({len(parts)} of {world} shards; missing "
                f"{', '.join(missing) or 'none'}{'; mixed world sizes ' + str(worlds) if len(worlds) > 1 else ''}): "
                "copy every rank's shards into that folder, or delete that step's files to reconstruct without it"
            )
        out[step] = [parts[r, world] for r in range(world)]
    return out


def list_snapshots(folder: str | Path) -> list[dict[str, Any]]:
    """One entry per (snapshot, profile): {"files" (the file, or its shards in rank order), "index", "step",
    "sigma_rel", "gamma"}, by step. Files are memory-mapped: only the small metadata is read."""
    folder = Path(folder)
    files = snapshot_files(folder)
    if not files:
        raise UserError(f"no post-hoc EMA snapshots in {folder}; train with ema.posthoc.enabled=true (or point "
                        "--snapshots at the folder ema.posthoc.dir named)")
    out = []
    for step, paths in files.items():
        snap = torch.load(paths[0], map_location="cpu", weights_only=True, mmap=True)
        for i, prof in enumerate(snap["profiles"]):
            out.append({"files": paths, "index": i, "step": step, "sigma_rel": float(prof["sigma_rel"]),
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


def _pieces(path: Path) -> tuple[dict[str, Any], int, int, dict[str, list[int]] | None]:
    """A snapshot file (memory-mapped), its (rank, world) and the whole shapes (None: its tensors are whole)."""
    snap = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return snap, int(snap.get("rank", 0)), int(snap.get("world_size", 1)), snap.get("shapes")


@torch.no_grad()
def combine(entries: list[dict[str, Any]], coefficients: np.ndarray) -> dict[str, Tensor]:
    """sum_k x_k * snapshot_k, accumulated in float64 one file (or one shard) at a time, each shard added
    into its slice of the flattened sum; integer tensors (counters) from the newest snapshot. Keys and
    dtypes as in the snapshots, shapes whole."""
    total: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    by_snapshot: dict[tuple[Path, ...], list[tuple[int, float]]] = {}
    for e, x in zip(entries, coefficients):
        by_snapshot.setdefault(tuple(e["files"]), []).append((e["index"], float(x)))
    for files, items in by_snapshot.items():
        for path in files:
            snap, rank, world, whole = _pieces(path)
            for index, x in items:
                for k, v in snap["profiles"][index]["state_dict"].items():
                    if not v.is_floating_point():
                        continue
                    dtypes[k] = v.dtype
                    acc = total.setdefault(k, torch.zeros(whole[k] if whole else v.shape, dtype=torch.float64))
                    torch.tensor_split(acc.view(-1), world)[rank].add_(v.reshape(-1).to(torch.float64), alpha=x)
    newest = max(entries, key=lambda e: e["step"])
    shapes: dict[str, Any] = {}  # in the snapshot's key order
    counters: dict[str, list[Tensor]] = {}
    for path in newest["files"]:
        snap, _, _, whole = _pieces(path)
        for k, v in snap["profiles"][newest["index"]]["state_dict"].items():
            shapes[k] = whole[k] if whole else v.shape
            if not v.is_floating_point():
                counters.setdefault(k, []).append(v.reshape(-1))
    return {k: total[k].to(dtypes[k]) if k in total else torch.cat(counters[k]).reshape(tuple(shape))
            for k, shape in shapes.items()}


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
