"""Preemption without SLURM: USR1 to a running `scalegen train` checkpoints at a step boundary and
exits with code 3; the same command resumes and ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from preempt_helpers import exact_resume_overrides, frozen, logged_step, signal_pending

REPO = Path(__file__).resolve().parents[2]
STEPS = 44  # two whole epochs: the last checkpoint is written at an epoch end


def args(runs: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "scalegen", "train", *exact_resume_overrides(runs, name, STEPS),
            "logging.wandb=false", "model.hidden=[64]"]


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
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and logged_step(runs / "preempted") < 3:
        time.sleep(0.05)
    with frozen([proc.pid]):  # the run would otherwise finish its ~1 s of training before the signal lands
        assert logged_step(runs / "preempted") < STEPS - 1
        proc.send_signal(signal.SIGUSR1)
        while not signal_pending(proc.pid, signal.SIGUSR1):
            time.sleep(0.01)
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
