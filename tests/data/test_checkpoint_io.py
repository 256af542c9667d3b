"""Saving checkpoints safely (issue 21 §3): a save killed by SIGKILL leaves a temporary file that the next
start removes (never one a live process is writing), and a save that finds the disk full leaves the previous
checkpoint intact and stops with one line saying how much space the checkpoint needs (a real tmpfs)."""

from __future__ import annotations

import copy
import json
import signal
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from scalegen.checkpoints import temporary_path
from scalegen.config.loader import load_config, resolved
from scalegen.errors import UserError
from scalegen.runtime.checkpoint import (
    AtomicCheckpointIO,
    DiskFullError,
    check_resume_recipe,
    recipe_changes,
    remove_stale_temporaries,
)

WRITER = """
import os, sys, time
print(os.getpid(), flush=True)
with open(sys.stdin.readline().strip(), "wb") as f:  # a save in progress: the temporary exists until the rename
    f.write(b"partial")
    f.flush()
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_killed_save_leaves_a_temporary_the_next_start_removes_but_never_a_live_ones(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    temps = []
    for p in procs:  # each writes where AtomicCheckpointIO in that process would
        temps.append(temporary_path(target, pid=int(p.stdout.readline())))
        p.stdin.write(f"{temps[-1]}\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "writing"
    assert all(t.exists() for t in temps) and temps[0] != temps[1]
    procs[0].send_signal(signal.SIGKILL)  # killed mid-save
    procs[0].wait(timeout=30)
    other_host = tmp_path / ".last.ckpt.tmp-some-other-host-1"  # may be a live process elsewhere
    other_host.write_bytes(b"x")
    try:
        assert remove_stale_temporaries(tmp_path) == [temps[0]]
        assert not temps[0].exists() and temps[1].exists() and other_host.exists()  # the live one stays
    finally:
        procs[1].kill()
        procs[1].wait(timeout=30)
    assert remove_stale_temporaries(tmp_path) == [temps[1]]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs (CI runs as root); skipped where mounting is not allowed."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield mount
    finally:
        for _ in range(10):
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:  # still busy (W&B's service process keeps its log open until this process exits): detach it
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_leaves_the_previous_checkpoint_and_names_the_space_needed(small_disk: Path) -> None:
    io = AtomicCheckpointIO()
    path = small_disk / "checkpoints" / "last.ckpt"
    small = {"state_dict": {"w": torch.arange(1000, dtype=torch.float32)}, "global_step": 1}
    io.save_checkpoint(small, path)
    before = path.read_bytes()
    big = {"state_dict": {"w": torch.zeros(3 * 2**20 // 4)}, "global_step": 2}  # 3 MiB of tensors
    with pytest.raises(DiskFullError) as caught:
        io.save_checkpoint(big, path)
    message = str(caught.value)
    assert "\n" not in message and "needs about 3.0 MiB" in message and "MiB free" in message
    assert path.read_bytes() == before  # the previous checkpoint, intact
    assert torch.load(path)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left behind
    assert temporary_path(path).name.startswith(".last.ckpt.tmp-")


def test_a_resume_with_a_changed_recipe_is_refused_naming_the_keys_unless_allowed(tmp_path: Path) -> None:
    saved = OmegaConf.to_container(resolved(load_config("quickstart")))
    ckpt = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "scalegen": {"config": saved}}, ckpt)
    same = copy.deepcopy(saved)
    same["trainer"]["resume"] = str(ckpt)  # how to resume is not part of the recipe
    check_resume_recipe(ckpt, same, [])
    changed = OmegaConf.to_container(resolved(load_config("quickstart", ["optim.lr=0.5", "trainer.max_steps=99",
                                                                          "model.latent_dim=3"])))
    assert recipe_changes(saved, changed) == ["model.latent_dim", "optim.lr", "trainer.max_steps"]
    with pytest.raises(UserError) as caught:
        check_resume_recipe(ckpt, changed, ["optim.lr"])
    assert "\n" not in str(caught.value)
    assert "model.latent_dim, trainer.max_steps;" in str(caught.value) and "optim.lr" not in str(caught.value)
    check_resume_recipe(ckpt, changed, ["optim.*", "trainer.max_steps", "model.latent_dim"])  # all allowed
    extra = copy.deepcopy(saved)
    extra["data"]["new_key"] = 1
    assert recipe_changes(saved, extra) == ["data.new_key"]  # added keys count as changes


def _wandb_records(path: Path) -> list:
    """The records of a W&B offline run file: LevelDB's log format (32 KiB blocks of records with a 7-byte
    header: crc32, length, type 1 full / 2 first / 3 middle / 4 last) after W&B's 7-byte file header, each a
    `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2  # optional dependency, as in the runtime

    data, pos, out, part = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the block's zero padding
            pos += left
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def test_a_save_that_finds_the_disk_full_loses_no_logged_metric(small_disk: Path, train_recipe) -> None:
    """A real run on the 2 MiB tmpfs whose first checkpoint (about 7 MiB) does not fit: training stops with the
    one-line error, and the metrics file and the W&B (offline) run hold every step logged until then, the
    failing step's included (Lightning hands a step's metrics to the loggers after the callback that saves)."""
    run = small_disk / "run"
    with pytest.raises(DiskFullError, match="needs about"):
        train_recipe("quickstart", run, "model.hidden=[512,512]", "trainer.max_steps=10", "trainer.max_epochs=null",
                     "trainer.log_every_n_steps=1", "checkpoint.every_n_train_steps=3", "checkpoint.monitor=train/loss",
                     "logging.wandb=true",
                     "trainer.num_sanity_val_steps=0")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [0, 1, 2]  # step 2 (the third) failed to save
    records = _wandb_records(next((run / "wandb").glob("offline-run-*/run-*.wandb")))
    history = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [0, 1, 2]
    assert [h["train/loss"] for h in history] == pytest.approx([r["train/loss"] for r in rows if "train/loss" in r])
    assert records[-1].WhichOneof("record_type") == "exit"  # the W&B run was closed, everything written
    assert not list((run / "checkpoints").glob(".*tmp*"))  # the failed save left nothing behind
