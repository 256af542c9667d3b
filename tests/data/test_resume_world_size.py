"""Resume at another world size (issue 21 §3), with real Trainers and real gloo DDP on CPU: a run checkpointed
mid-epoch with 2 processes resumes with 1 (and one with 1 with 2); the two runs together see every training
sample of the epoch exactly once (recorded keys), and the resumed run starts from exactly the saved optimizer
moments, LR schedule, EMA average, weights and global step."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _run(out: Path, runs: Path, devices: int, *overrides: str) -> None:
    cmd = [sys.executable, str(HERE / "resume_worker.py"), str(out), "quickstart", "trainer.accelerator=cpu",
           f"trainer.devices={devices}", "trainer.strategy=ddp", "trainer.global_batch_size=128",
           "trainer.record_sample_keys=true", "trainer.progress_bar=false", "trainer.num_sanity_val_steps=0",
           "trainer.limit_val_batches=1", "ema.enabled=true", "ema.decay=0.9", "model.hidden=[32]",
           "trainer.log_every_n_steps=1",  # rows on every step of these few-step runs (the quickstart logs every 50)
           f"run.dir={runs}", "run.name=run", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _keys(run: Path) -> list[str]:
    return [k for f in sorted((run / "sample_keys").glob("rank*.txt")) for k in f.read_text().split()]


def _assert_restored(probe: dict, saved: dict) -> None:
    assert probe["global_step"] == saved["global_step"] > 0
    opt = saved["optimizer_states"][0]
    assert probe["optimizer"]["state"].keys() == opt["state"].keys()
    for i, state in opt["state"].items():  # Adam's step count and both moments, bit for bit
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(probe["optimizer"]["state"][i][name]), torch.as_tensor(value)), name
    assert probe["scheduler"] == saved["lr_schedulers"][0]  # the schedule continues from the saved step
    assert probe["ema"].keys() == saved["ema_state_dict"].keys()
    for k, v in saved["ema_state_dict"].items():
        assert torch.equal(probe["ema"][k], v), k
    for k, v in saved["state_dict"].items():
        assert torch.equal(probe["weights"][k], v), k


@pytest.mark.slow
@pytest.mark.parametrize("before, after, steps", [(2, 1, 4), (1, 2, 3)])
def test_mid_epoch_resume_at_another_world_size_sees_the_rest_exactly_once(tmp_path: Path, before, after,
                                                                          steps) -> None:
    runs = tmp_path / "runs"
    wandb = ["logging.wandb=true"] if before == 2 else ["logging.wandb=false"]
    _run(tmp_path / "a", runs, before, f"trainer.max_steps={steps}", "trainer.max_epochs=null", *wandb)
    run = runs / "run"
    saved_path = tmp_path / "saved.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", saved_path)
    saved = torch.load(saved_path, weights_only=False)
    seen_before = _keys(run)
    assert saved["global_step"] == steps and 0 < len(seen_before) <= steps * 128  # at most 64 per process per batch
    for f in (run / "sample_keys").glob("*.txt"):
        f.unlink()

    # Lightning counts a run stopped by max_steps as a finished epoch: its "second" epoch is the rest of this one.
    _run(tmp_path / "b", runs, after, "trainer.max_steps=-1", "trainer.max_epochs=2", *wandb,
         "trainer.resume_allow_changes=[trainer.devices,trainer.max_steps,trainer.max_epochs]")
    seen_after = _keys(run)
    manifest = json.loads(Path(os.environ["SCALEGEN_DATA"], "digits", "manifest.json").read_text())
    train_count = sum(s["count"] for s in manifest["splits"]["train"]["shards"])
    visits = collections.Counter(seen_before + seen_after)
    assert len(visits) == train_count and set(visits.values()) == {1}  # the epoch: every sample exactly once
    for rank in range(after):
        probe = torch.load(tmp_path / "b" / f"rank{rank}.pt", weights_only=False)
        assert probe["world_size"] == after
        _assert_restored(probe, saved)
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] > steps and final["ShardDataModule"]["train"]["world"] == after
    steps_logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(steps_logged)  # one metrics file, continued
    if before == 2:  # W&B (offline): the resumed session logs to the same run
        run_id = (run / "wandb_run_id").read_text().strip()
        assert {p.name for p in (run / "wandb").glob("offline-run-*/run-*.wandb")} == {f"run-{run_id}.wandb"}
