"""Render, store and submit the sbatch script of a run (`scalegen slurm submit`).

The script comes from `cluster/sbatch.template`; site-specific settings (modules, container,
environment, extra #SBATCH options) come from a cluster profile (`cluster/profiles/*.yaml`). The
run folder and the world size are pinned as overrides at submission, so a requeued job writes to
the same folder and resumes from its newest checkpoint.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from string import Template
from typing import Any

from omegaconf import OmegaConf

from scalegen.config import load_config
from scalegen.config.loader import find_recipe, run_dir_of
from scalegen.distributed.batching import batch_plan
from scalegen.errors import UserError

CLUSTER_DIR = Path(os.environ.get("SCALEGEN_CLUSTER_DIR", Path(__file__).resolve().parents[2] / "cluster"))
TEMPLATE = "sbatch.template"


@dataclass
class ClusterProfile:
    """Site settings; see cluster/profiles/default.yaml for what each key means."""

    python: str = "python"
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    launcher: str = ""
    sbatch: dict[str, Any] = field(default_factory=dict)
    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int = 8
    signal_seconds: int = 300
    name: str = "default"


def load_profile(name_or_path: str | None) -> ClusterProfile:
    """A profile by path or by name in cluster/profiles/ (default: `default`)."""
    name_or_path = name_or_path or os.environ.get("SCALEGEN_CLUSTER_PROFILE") or "default"
    path = Path(name_or_path)
    if not path.is_file():
        path = CLUSTER_DIR / "profiles" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CLUSTER_DIR / "profiles").glob("*.yaml"))
        raise UserError(
            f"cluster profile {name_or_path!r} not found; known: {', '.join(known) or 'none'} "
            f"(in {CLUSTER_DIR / 'profiles'}), or pass a path"
        )
    raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
    schema = OmegaConf.structured(ClusterProfile)
    try:
        merged = OmegaConf.merge(
            schema, {k: v for k, v in raw.items() if v is not None or k in ("partition", "account")}
        )
    except Exception as err:
        raise UserError(f"cluster profile {path}: {str(err).splitlines()[0]}") from None
    profile = ClusterProfile(**OmegaConf.to_container(merged))  # type: ignore[arg-type]
    profile.name = str(path)
    return profile


@dataclass
class Submission:
    recipe: str
    overrides: list[str]
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    run_dir: Path
    script: str


def _sbatch_lines(profile: ClusterProfile, partition: str | None, account: str | None, gpus: int) -> str:
    options: dict[str, Any] = {}
    if gpus > 0:
        options["gpus-per-node"] = gpus
    if partition or profile.partition:
        options["partition"] = partition or profile.partition
    if account or profile.account:
        options["account"] = account or profile.account
    for key, value in (profile.sbatch or {}).items():
        options[str(key).replace("_", "-")] = value
    lines = []
    for key, value in options.items():
        if value is False or value is None:
            continue
        lines.append(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={value}")
    return "\n".join(lines)


def render(
    recipe: str,
    overrides: list[str],
    *,
    nodes: int,
    gpus_per_node: int,
    tasks_per_node: int | None = None,
    partition: str | None = None,
    time: str | None = None,
    account: str | None = None,
    profile: ClusterProfile | None = None,
    job_name: str | None = None,
) -> Submission:
    """The sbatch script for training `recipe` on nodes x tasks_per_node processes (one per GPU)."""

    profile = profile or load_profile(None)
    if nodes < 1:
        raise UserError(f"--nodes {nodes}: need at least one node")
    if gpus_per_node < 0:
        raise UserError(f"--gpus-per-node {gpus_per_node} must be >= 0 (0 = CPU tasks)")
    tasks = tasks_per_node or (gpus_per_node if gpus_per_node > 0 else 1)
    if gpus_per_node > 0 and tasks != gpus_per_node:
        raise UserError(
            f"--tasks-per-node {tasks} must equal --gpus-per-node {gpus_per_node}: one task per GPU"
        )
    cfg = load_config(recipe, overrides)  # fail on a bad recipe here, not in the queue
    pinned = [
        f"trainer.num_nodes={nodes}",
        f"trainer.devices={tasks}",
        f"trainer.accelerator={'gpu' if gpus_per_node > 0 else 'cpu'}",
    ]
    if cfg.trainer.strategy == "auto" and nodes * tasks > 1:
        pinned.append("trainer.strategy=ddp")
    cfg = load_config(recipe, list(overrides) + pinned)
    run_dir = run_dir_of(cfg).resolve()
    pinned += [f"run.dir={run_dir.parent}", f"run.name={run_dir.name}", "trainer.resume=auto"]
    cfg = load_config(recipe, list(overrides) + pinned)
    batch_plan(cfg.trainer, cfg.data.batch_size, cfg.optim, world=nodes * tasks)  # global batch must divide

    recipe_path = str(find_recipe(recipe))
    command = " ".join(
        shlex.quote(x) for x in [profile.python, "-m", "scalegen", "train", recipe_path, *overrides, *pinned]
    )
    setup = list(profile.setup or [])
    setup += [f"export {k}={shlex.quote(str(v))}" for k, v in (profile.env or {}).items()]
    values = {
        "job_name": job_name or re.sub(r"[^A-Za-z0-9_.-]", "_", f"scalegen-{run_dir.name}"),
        "nodes": nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": profile.cpus_per_task,
        "time": time or profile.time,
        "signal": "USR1" if cfg.trainer.requeue_signal == "SIGUSR1" else "USR2",
        "signal_seconds": profile.signal_seconds,
        "run_dir": str(run_dir),
        "sbatch_lines": _sbatch_lines(profile, partition, account, gpus_per_node),
        "setup": "\n".join(setup),
        "workdir": shlex.quote(os.getcwd()),
        "launcher": profile.launcher,
        "command": command,
        "profile_name": profile.name,
    }
    template = (CLUSTER_DIR / TEMPLATE).read_text()
    try:
        script = Template(template).substitute(values)
    except (KeyError, ValueError) as err:
        raise UserError(f"{CLUSTER_DIR / TEMPLATE}: bad placeholder {err}") from None
    return Submission(recipe_path, list(overrides), nodes, gpus_per_node, tasks, run_dir, script)


def submit(sub: Submission, sbatch: str = "sbatch") -> tuple[str, Path]:
    """Store the script in the run folder and submit it; (job id, script path)."""
    folder = sub.run_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"submit-{stamp}.sbatch"
    path.write_text(sub.script)
    path.chmod(0o755)
    try:
        proc = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UserError(
            f"`{sbatch}` not found: is this a SLURM login node? (script kept at {path}; --dry-run prints it)"
        ) from None
    if proc.returncode != 0:
        raise UserError(
            f"sbatch refused {path}: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}"
        )
    job_id = proc.stdout.strip().split(";")[0]
    with open(folder / "jobs.txt", "a") as f:
        f.write(f"{job_id}\t{stamp}\t{path.name}\n")
    return job_id, path

