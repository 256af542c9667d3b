"""What the two preemption tests share: the run they train, reading its progress, and landing a signal mid-run.

Both runs train for about a second, less than a signal may take to arrive (through the batch shell and srun
under SLURM), so the tests freeze the training processes (SIGSTOP), send the signal, wait until it is
pending in each of them, and thaw them: the signal then lands mid-run on any machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path


def exact_resume_overrides(runs: Path, name: str, steps: int) -> list[str]:
    """Recipe and overrides: the quickstart for `steps` optimizer steps, deterministic, logging every step,
    with an EMA."""
    return [
        "quickstart",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=null",
        "trainer.log_every_n_steps=1",
        "trainer.deterministic=true",
        "trainer.progress_bar=false",
        "ema.enabled=true",
        "ema.decay=0.9",
        f"run.dir={runs}",
        f"run.name={name}",
    ]


def logged_step(run_dir: Path) -> int:
    """The last step in the run's metrics file (-1 before the first)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return -1
    steps = [json.loads(line).get("step", -1) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=-1)


def signal_pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits, undelivered, in a (stopped) process: /proc's pending-signal masks."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = re.findall(r"^(?:ShdPnd|SigPnd):\s*([0-9a-f]+)$", status, re.M)
    return any(int(mask, 16) >> (signum - 1) & 1 for mask in masks)


@contextlib.contextmanager
def frozen(pids: list[int]) -> Iterator[None]:
    """The processes stopped (SIGSTOP) inside the block, continued (SIGCONT) after it."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
