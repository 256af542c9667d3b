"""Two real processes on CPU (DDP over gloo): each rank sees different data, the checkpoint loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from scalegen.runtime import load_model

REPO = Path(__file__).resolve().parents[1]


def test_ddp_two_processes_split_the_data(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "scalegen", "train", "quickstart", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.strategy=ddp", "trainer.max_epochs=1", "trainer.record_sample_keys=true",
           "trainer.progress_bar=false", "logging.wandb=false", f"run.dir={tmp_path}", "run.name=ddp"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "ddp"
    assert out.stdout.count("run folder:") == 1  # said once, by rank 0, not by every process
    keys = [set((run / "sample_keys" / f"rank{r}.txt").read_text().split()) for r in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]  # different data on each rank
    manifest = json.loads(Path(os.environ["SCALEGEN_DATA"], "digits", "manifest.json").read_text())
    train_count = sum(s["count"] for s in manifest["splits"]["train"]["shards"])
    assert len(keys[0] | keys[1]) == train_count  # one epoch saw every training sample exactly once
    model, cfg = load_model(run / "checkpoints" / "last.ckpt")
    assert cfg.trainer.devices == 2 and model.sample(4).shape == (4, 1, 8, 8)
