"""Preemption without SLURM: USR1 to a running `scalegen train` checkpoints at a step boundary and
exits with code 3; the same command resumes and ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = 44  # two whole epochs: the last checkpoint is written at an epoch end


def args(runs: Path, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "scalegen",
        "train",
        "quickstart",
        f"trainer.max_steps={STEPS}",
        "trainer.max_epochs=null",
        "trainer.log_every_n_steps=1",
        "trainer.deterministic=true",
        "trainer.progress_bar=false",
        "ema.enabled=true",
        "ema.decay=0.9",
        "logging.wandb=false",
        "model.hidden=[64]",
        f"run.dir={runs}",
        f"run.name={name}",
    ]


@pytest.mark.slow
def test_signal_checkpoints_and_the_same_command_resumes_exactly(tmp_path):
    from scalegen.data import prepare_dataset

    prepare_dataset("digits", tmp_path / "data" / "digits", progress=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCALEGEN_DATA": str(tmp_path / "data")}
    runs = tmp_path / "runs"
    subprocess.run(args(runs, "reference"), cwd=REPO, env=env, check=True, capture_output=True)

    proc = subprocess.Popen(
        args(runs, "preempted"), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = runs / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(
            json.loads(line).get("step", -1) >= 3 for line in metrics.read_text().splitlines()
        ):
            proc.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    marker = (runs / "preempted" / ".preempted").read_text()
    step = int(marker.split("step=")[1].split()[0])
    assert 3 <= step < STEPS and f"preempted by SIGUSR1 at step {step}" in err
    saved = torch.load(runs / "preempted" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == step and "rng_states" in saved and "ema_state_dict" in saved

    subprocess.run(args(runs, "preempted"), cwd=REPO, env=env, check=True, capture_output=True)
    a = torch.load(runs / "preempted" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(runs / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    for key in ("state_dict", "ema_state_dict"):
        for k in b[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert not (runs / "preempted" / ".preempted").exists()
