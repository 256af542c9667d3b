"""The data-throughput benchmark runs end to end and its table adds up (no timing is asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_data_throughput_benchmark_prints_a_consistent_table(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "data_throughput.py"), "--datasets", "digits"]
    cmd += ["--workers", "0", "--samples", "3000", "--slice", "700", "--root", str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^\| digits \| 0 \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \|$", out.stdout, re.M)
    assert len(rows) == 1, out.stdout
    shards, memory, ratio = (float(v.replace(",", "")) for v in rows[0])
    assert shards > 0 and memory > 0
    assert abs(ratio - memory / shards) < 0.006  # the ratio is of times per sample: memory rate / shard rate
    assert out.stdout.rstrip().endswith(f"ratio: {rows[0][2]}")  # the worst (only) row
    assert (tmp_path / "digits" / "manifest.json").is_file()  # it prepared real shards to read
