"""The family contract's new parts, exercised by the three test-only families of contract_families.py
under 2 CPU processes (gloo DDP, real Lightning Trainers through `scalegen.runtime.train`):

(a) a per-rank replay buffer survives a preemption: the resumed run ends bitwise equal to an
    uninterrupted one, with each rank's own buffer;
(b) a second stage over a frozen first stage is evaluated by `scalegen eval` from its own checkpoint;
(c) a semi-supervised family sees exactly N labels per class across both ranks and a resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import contract_families
import pytest
import torch

from scalegen.checkpoints import load_model
from scalegen.cli.main import main
from scalegen.config.schema import OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.errors import UserError
from scalegen.hub import load_release_model, make_release

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "cluster"))
from preempt_helpers import frozen, logged_step, signal_pending  # noqa: E402

WORKER = Path(__file__).with_name("contract_worker.py")
STEPS = 24  # optimizer steps; mid-epoch (the digits' training split is ~44 batches of 2 x 16)

RECIPE = """\
model:
  family: {family}
data:
  dataset: digits
  batch_size: 16
optim:
  lr: 5.0e-2
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  precision: 32-true
  max_steps: {steps}
  max_epochs: null
  log_every_n_steps: 1
  deterministic: true
  progress_bar: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
logging:
  wandb: false
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from scalegen.data import prepare_dataset

    data = tmp_path_factory.mktemp("data")
    prepare_dataset("digits", data / "digits", progress=False)
    paths = [str(REPO), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "SCALEGEN_DATA": str(data),
            "OMP_NUM_THREADS": "1"}


def recipe(tmp: Path, family: str, steps: int = STEPS) -> str:
    path = tmp / f"{family}.yaml"
    path.write_text(RECIPE.format(family=family, steps=steps))
    return str(path)


def command(recipe_path: str, runs: Path, name: str, *overrides: str) -> list[str]:
    return [sys.executable, str(WORKER), recipe_path, f"run.dir={runs}", f"run.name={name}", *overrides]


def run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


def preempt(cmd: list[str], env: dict[str, str], run_dir: Path, after: int = 4) -> int:
    """Start `cmd`, land SIGUSR1 on rank 0 once `after` steps are logged; returns the preempted step."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and logged_step(run_dir) < after:
        time.sleep(0.05)
    with frozen([proc.pid]):
        assert logged_step(run_dir) < STEPS - 1, "the run finished before the signal"
        proc.send_signal(signal.SIGUSR1)
        # Pending once the stop has taken effect; if the handler ran just before it did, the flag is set
        # already and nothing stays pending, so wait a bounded time only.
        waited = time.monotonic() + 5
        while not signal_pending(proc.pid, signal.SIGUSR1) and time.monotonic() < waited:
            time.sleep(0.01)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err[-4000:]
    return int((run_dir / ".preempted").read_text().split("step=")[1].split()[0])


def last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


# ---- (a) per-rank state ----------------------------------------------------------------------------
@pytest.mark.slow
def test_per_rank_buffer_resumes_bitwise_after_a_preemption(tmp_path: Path, env: dict[str, str]) -> None:
    runs, path = tmp_path / "runs", recipe(tmp_path, "test_buffered")
    run(command(path, runs, "reference"), env)
    step = preempt(command(path, runs, "preempted"), env, runs / "preempted")
    saved = last(runs / "preempted")
    assert saved["global_step"] == step and len(saved["rank_states"]) == 2
    assert saved["rank_states"][0]["updates"] == saved["rank_states"][1]["updates"] == step
    assert not torch.equal(saved["rank_states"][0]["buffer"], saved["rank_states"][1]["buffer"])  # per rank
    run(command(path, runs, "preempted"), env)  # the same command resumes

    a, b = last(runs / "preempted"), last(runs / "reference")
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in b["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for rank in (0, 1):  # each rank's buffer came back to that rank and evolved as without the preemption
        assert torch.equal(a["rank_states"][rank]["buffer"], b["rank_states"][rank]["buffer"]), rank
        assert a["rank_states"][rank]["updates"] == STEPS


def _buffered() -> contract_families.Buffered:
    return contract_families.Buffered(contract_families.BufferedConfig(buffer_size=4), OptimConfig(),
                                      DataSpec(shape=(1, 2, 2)))


def test_a_different_world_size_is_re_dealt_or_refused_in_one_line() -> None:
    states = {r: {"buffer": torch.full((4, 1, 2, 2), r, dtype=torch.uint8), "updates": 5} for r in range(4)}
    model = _buffered()  # outside a Trainer: global_rank 0
    model.load_rank_state(states, saved_world_size=4, world_size=2)  # rank 0 of 2 takes saved ranks 0, 2
    assert model.buffer.flatten().tolist() == [0] * 16 and model.updates == 5
    # A family that does not re-deal (the default) refuses, saying so.
    semi = contract_families.SemiSupervised(contract_families.SemiSupervisedConfig(), OptimConfig(),
                                            DataSpec(shape=(1, 2, 2), num_classes=2))
    with pytest.raises(UserError, match="per-rank state of 4 ranks and this run has 2.*resume with 4"):
        semi.load_rank_state({r: {"keys": ["k"], "labels": [0]} for r in range(4)}, 4, 2)


# ---- (b) a first stage -----------------------------------------------------------------------------
@pytest.mark.slow
def test_second_stage_is_evaluated_from_its_own_checkpoint(tmp_path: Path, env: dict[str, str],
                                                           train_recipe) -> None:
    stage1 = train_recipe("quickstart", tmp_path / "runs" / "vae", "trainer.max_steps=30", "trainer.max_epochs=null",
                          "model.hidden=[32]", "model.latent_dim=4", f"data.root={env['SCALEGEN_DATA']}/digits")
    stage1_ckpt = stage1 / "checkpoints" / "last.ckpt"
    runs, path = tmp_path / "runs", recipe(tmp_path, "test_latent_prior", steps=12)
    run(command(path, runs, "prior", f"model.stage1={stage1}"), env)

    ckpt = last(runs / "prior")
    assert ckpt["stage1"] == {"path": str(stage1_ckpt), "sha256": hashlib.sha256(stage1_ckpt.read_bytes()).hexdigest()}
    first = torch.load(stage1_ckpt, weights_only=True)
    first_weights = first.get("ema_state_dict", first["state_dict"])
    for k, v in first_weights.items():  # the first stage stayed frozen through DDP training
        assert torch.equal(ckpt["state_dict"][f"stage1.{k}"], v), k
    assert ckpt["state_dict"]["mu"].abs().max() > 1e-3  # the second stage trained

    budget = ["--metrics", "linear_probe", "eval.max_examples=300", "eval.probe_seeds=1", "eval.probe_steps=50",
              "eval.probe_train_examples=300"]
    for name, source in (("prior", runs / "prior" / "checkpoints" / "last.ckpt"), ("vae", stage1_ckpt)):
        assert main(["eval", str(source), "--out", str(tmp_path / name), "--no-wandb", *budget]) == 0
    prior, vae = (json.loads((tmp_path / n / "metrics.json").read_text())["metrics"] for n in ("prior", "vae"))
    # The probe standardizes its features, and the prior's codes are an affine map of the VAE's: the same
    # accuracy up to one example's flip from float rounding.
    assert abs(prior["linear_probe"]["value"] - vae["linear_probe"]["value"]) <= 1.0 / prior["linear_probe"]["test"]

    # A release of the second stage carries the first stage's weights and references its checkpoint by sha256.
    release = make_release(runs / "prior", tmp_path / "release")
    assert json.loads((release / "release.json").read_text())["stage1"] == ckpt["stage1"]
    from_release, _ = load_release_model(release)
    torch.testing.assert_close(from_release.encode(torch.zeros(2, 1, 8, 8, dtype=torch.uint8)),
                               load_model(runs / "prior")[0].encode(torch.zeros(2, 1, 8, 8, dtype=torch.uint8)))

    # A changed first stage is refused when the second stage is loaded.
    tampered = dict(first)
    tampered["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in first["state_dict"].items()}
    torch.save(tampered, stage1_ckpt)
    with pytest.raises(UserError, match="first stage .* had sha256"):
        load_model(runs / "prior")
    with pytest.raises(UserError, match="first stage .* had sha256"):
        load_release_model(release)


# ---- (c) partly labelled data ------------------------------------------------------------------------
@pytest.mark.slow
def test_semi_supervised_family_sees_exactly_n_labels_per_class_across_ranks_and_a_resume(
        tmp_path: Path, env: dict[str, str]) -> None:
    n = 3
    runs, path = tmp_path / "runs", recipe(tmp_path, "test_semisup")
    cmd = command(path, runs, "semi", f"data.labels_per_class={n}", "data.label_seed=7")
    preempt(cmd, env, runs / "semi")
    before = last(runs / "semi")["rank_states"]
    run(cmd, env)
    after = last(runs / "semi")["rank_states"]

    def labelled(states: list[dict]) -> dict[str, int]:
        pairs: dict[str, int] = {}
        for state in states:
            for key, label in zip(state["keys"], state["labels"]):
                assert pairs.setdefault(key, label) == label, key  # one label per key, on both ranks
        return pairs

    final = labelled(after)
    assert Counter(final.values()) == {c: n for c in range(10)}  # exactly N labelled examples per class
    assert labelled(before).items() <= final.items()  # the same labelled examples before and after the resume
    assert all(len(s["keys"]) > 0 for s in after)  # both ranks were given labels
