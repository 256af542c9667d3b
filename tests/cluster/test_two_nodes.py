"""Two nodes on one machine (issue 21 §4): two `scalegen train` processes with `trainer.num_nodes=2`, one device
each, joined over the loopback address through the environment Lightning's `LightningEnvironment` reads for a
multi-node job it does not launch itself (MASTER_ADDR, MASTER_PORT, NODE_RANK, LOCAL_RANK, WORLD_SIZE).

Node 1 writes into a folder of its own (a node-local disk), so what it writes is seen apart from node 0's. One
epoch of the digits (1,347 samples, 64 per node and step: 11 steps): together the nodes see every training
sample exactly once; the checkpoint is written once, by node 0; and a run stopped after 5 steps and resumed
on both nodes from that checkpoint ends with the same weights, bit for bit, and the same samples, as the
uninterrupted run."""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EPOCH = 11  # ceil(1347 / 2 nodes / 64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(runs: Path, name: str, *overrides: str) -> None:
    """Both nodes of one job; node n trains in runs/node{n}/name and must exit 0."""
    port, procs = _free_port(), []
    for node in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "NODE_RANK": str(node), "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
        cmd = [sys.executable, "-m", "scalegen", "train", "quickstart", "trainer.accelerator=cpu", "trainer.devices=1",
               "trainer.num_nodes=2", "trainer.strategy=ddp", "trainer.max_epochs=null", "trainer.deterministic=true",
               "trainer.record_sample_keys=true", "trainer.progress_bar=false", "trainer.num_sanity_val_steps=0",
               "logging.wandb=false", "model.hidden=[32]", f"run.dir={runs / f'node{node}'}", f"run.name={name}",
               *overrides]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for node, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {node}:\n{out[-4000:]}"


def _keys(runs: Path, name: str) -> list[str]:
    return [k for node in (0, 1) for f in sorted((runs / f"node{node}" / name / "sample_keys").glob("rank*.txt"))
            for k in f.read_text().split()]


@pytest.mark.slow
def test_two_nodes_see_every_sample_once_write_one_checkpoint_and_resume_exactly(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _two_nodes(runs, "straight", f"trainer.max_steps={EPOCH}")
    node0, node1 = runs / "node0" / "straight", runs / "node1" / "straight"
    assert [p.name for p in (node0 / "sample_keys").iterdir()] == ["rank0.txt"]  # node 0 is global rank 0 ...
    assert [p.name for p in (node1 / "sample_keys").iterdir()] == ["rank1.txt"]  # ... and node 1 global rank 1
    manifest = json.loads(Path(os.environ["SCALEGEN_DATA"], "digits", "manifest.json").read_text())
    train_count = sum(s["count"] for s in manifest["splits"]["train"]["shards"])
    straight = _keys(runs, "straight")
    visits = collections.Counter(straight)
    assert len(visits) == train_count and set(visits.values()) == {1}  # the epoch: every sample exactly once
    assert (node0 / "checkpoints" / "last.ckpt").is_file()
    assert not (node1 / "checkpoints").exists() or not list((node1 / "checkpoints").iterdir())  # written once
    assert not (node1 / "config.yaml").exists() and not (node1 / "metrics.jsonl").exists()

    _two_nodes(runs, "resumed", "trainer.max_steps=5")
    ckpt = runs / "node0" / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 5
    # Both nodes resume from node 0's checkpoint (node 1's own folder has none, so it is named; the folder
    # differs from the one in the checkpoint's recipe, hence run.dir in the allowed changes).
    _two_nodes(runs, "resumed", f"trainer.max_steps={EPOCH}", f"trainer.resume={ckpt}",
               "trainer.resume_allow_changes=[trainer.max_steps,run.dir]")
    assert _keys(runs, "resumed") == straight  # the same samples, in the same order on each rank
    a = torch.load(ckpt, weights_only=True)
    b = torch.load(node0 / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == EPOCH
    for k, v in b["state_dict"].items():
        assert torch.equal(a["state_dict"][k], v), k
