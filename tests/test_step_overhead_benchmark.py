"""The step-overhead benchmark runs end to end, its table adds up and its call counts are counts (no timing is
asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_step_overhead_benchmark_prints_a_consistent_table(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SCALEGEN_DATA": str(tmp_path)}
    cmd = [sys.executable, str(REPO / "benchmarks" / "step_overhead.py"), "--config", "small", "--repeats", "1",
           "--steps", "30", "--count-calls"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rates = re.search(r"^small +([\d.]+) +([\d.]+) +([\d.]+) +[\d.]+ +[\d.]+ +([\d.]+) +(-?[\d.]+)$", out.stdout, re.M)
    assert rates, out.stdout
    plain, bare, ours, ratio, gap = (float(v) for v in rates.groups())
    assert min(plain, bare, ours) > 0
    assert abs(ratio - ours / bare) < 0.002
    # The gap is printed to 0.01 ms and computed from unrounded rates, printed to 0.1 steps/s: recomputed from the
    # printed rates it may differ by each rounding (0.005, and 1000 * 0.05 / rate^2 for each rate).
    assert abs(gap - (1000 / ours - 1000 / bare)) <= 0.005 + 50 / ours**2 + 50 / bare**2
    assert out.stdout.rstrip().endswith(f"ratio: {ratio:.3f}")  # the worst (only) config
    calls = re.search(r"^small +(\d+) +(\d+) +(-?\d+)$", out.stdout, re.M)
    assert calls, out.stdout
    bare_calls, our_calls, extra = (int(v) for v in calls.groups())
    # A Lightning step of this network makes thousands of Python calls; scalegen's adds its loader, logging and
    # callbacks on top of the same loop.
    assert 1000 < bare_calls < our_calls and abs(extra - (our_calls - bare_calls)) <= 1  # each rounded
