"""benchmarks/gpu_check.py: its CPU path end to end (CI runs it too), and the peak table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from gpu_check import peak_for_name  # noqa: E402


def test_peak_table_matches_the_most_specific_name():
    assert peak_for_name("NVIDIA H100 80GB HBM3")[0] == 989.0  # SXM
    assert peak_for_name("NVIDIA H100 PCIe")[0] == 756.0
    assert peak_for_name("NVIDIA H200")[0] == 989.0
    assert peak_for_name("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert peak_for_name("NVIDIA L4")[0] == 121.0 and peak_for_name("NVIDIA L40S")[0] == 362.0
    peak, why = peak_for_name("Tesla T4")
    assert peak is None and "--peak-tflops" in why


@pytest.mark.slow
def test_cpu_tiny_path_writes_a_passing_report(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), str(tmp_path), "--device", "cpu", "--tiny"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    c = report["checks"]
    assert report["ok"] and report["tiny"] and set(c) == {"unet", "strategies", "inception", "syncs"}
    u = c["unet"]
    assert u["eager_images_per_s"] > 0 and u["compiled_images_per_s"] > 0 and u["compile_backend"] == "eager"
    assert u["train_flops_per_image"] > 0 and u["mfu_eager"] is None  # no CPU peak without --peak-tflops
    runs = c["strategies"]["runs"]
    assert len(runs["ddp"]["losses"]) == 5 and runs["ddp"]["loaded"] and runs["ddp"]["ema_vs_raw"] > 1e-4
    assert all("CUDA only" in runs[s]["skipped"] for s in ("deepspeed_stage_2", "deepspeed_stage_3", "fsdp"))
    assert runs["ddp"]["quiet_steps"] >= 2 and runs["ddp"]["syncs_per_quiet_step"] == 0  # through the Trainer
    assert c["syncs"]["scalar_reads_per_step"] == 0
    assert c["inception"]["fp32_images_per_s"] > 0 and c["inception"]["bf16_feature_rel_diff"] < 0.05
    assert c["inception"]["channels_last_feature_rel_diff"] <= 1e-4
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| check | result | status |" in table and "FAIL" not in table
