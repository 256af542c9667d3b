"""The runtime end to end: the quickstart's run folder, resume, atomic checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from scalegen.errors import UserError
from scalegen.runtime import load_model, read_checkpoint
from scalegen.runtime.checkpoint import AtomicCheckpointIO


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory, train_recipe) -> Path:
    """The quickstart recipe, shortened, with W&B (offline) on as a user would have it."""
    return train_recipe("quickstart", tmp_path_factory.mktemp("qs") / "quickstart", "trainer.max_epochs=3",
                        "logging.wandb=true")


def test_quickstart_run_folder_has_everything(quickstart_run: Path) -> None:
    cfg = yaml.safe_load((quickstart_run / "config.yaml").read_text())
    assert cfg["model"]["family"] == "vae" and cfg["trainer"]["max_epochs"] == 3
    assert "${" not in (quickstart_run / "config.yaml").read_text()  # resolved
    rows = [json.loads(line) for line in (quickstart_run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in rows) and any("val/loss" in r for r in rows)
    assert any("val/bpd" in r for r in rows)
    for png in ("samples.png", "reconstructions.png", "loss_curve.png"):
        img = Image.open(quickstart_run / png)
        img.verify()
    assert Image.open(quickstart_run / "samples.png").size[0] >= 64
    wandb_runs = list((quickstart_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_runs) == 1 and wandb_runs[0].stat().st_size > 0
    run_id = (quickstart_run / "wandb_run_id").read_text().strip()
    assert wandb_runs[0].name == f"run-{run_id}.wandb"


def test_val_samples_zero_draws_no_samples_and_keeps_the_other_figures(tmp_path: Path, train_recipe) -> None:
    run = train_recipe("quickstart", tmp_path / "no-samples", "trainer.max_epochs=1", "trainer.val_samples=0")
    assert not (run / "samples.png").exists()
    for png in ("reconstructions.png", "loss_curve.png"):
        Image.open(run / png).verify()


def test_checkpoint_carries_config_and_rebuilds_the_model(quickstart_run: Path) -> None:
    ckpt = read_checkpoint(quickstart_run / "checkpoints" / "last.ckpt")
    saved = yaml.safe_load((quickstart_run / "config.yaml").read_text())
    assert ckpt["scalegen"]["config"] == saved
    model, cfg = load_model(quickstart_run / "checkpoints" / "last.ckpt")
    assert cfg.model.latent_dim == saved["model"]["latent_dim"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][name])
    assert len(list((quickstart_run / "checkpoints").glob("best-*.ckpt"))) == 1


def test_resume_auto_continues_from_the_last_checkpoint(quickstart_run: Path, train_recipe) -> None:
    before = read_checkpoint(quickstart_run / "checkpoints" / "last.ckpt")["global_step"]
    with pytest.raises(UserError, match=r"recipe changed in trainer\.max_epochs.*resume_allow_changes"):
        train_recipe("quickstart", quickstart_run, "trainer.max_epochs=4", "logging.wandb=true")
    train_recipe("quickstart", quickstart_run, "trainer.max_epochs=4", "logging.wandb=true",
                 "trainer.resume_allow_changes=[trainer.max_epochs]")
    after = read_checkpoint(quickstart_run / "checkpoints" / "last.ckpt")
    assert after["epoch"] >= 3 and after["global_step"] > before  # epochs 0-2 were not re-run
    steps = [json.loads(line)["step"] for line in (quickstart_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # the metrics file continues; nothing restarts from step 0
    run_files = list((quickstart_run / "wandb").glob("offline-run-*/run-*.wandb"))
    run_id = (quickstart_run / "wandb_run_id").read_text().strip()
    assert {p.name for p in run_files} == {f"run-{run_id}.wandb"}  # the resumed session logs to the same W&B run


def test_each_run_in_one_process_logs_to_its_own_wandb_run(tmp_path: Path, train_recipe) -> None:
    """A second train() in the same process (a notebook, a sweep) gets its own W&B run, not the first's."""
    for name in ("first", "second"):
        train_recipe("quickstart", tmp_path / name, "trainer.max_steps=3", "trainer.max_epochs=null",
                     "logging.wandb=true", "trainer.limit_val_batches=1")
    for name in ("first", "second"):
        run_id = (tmp_path / name / "wandb_run_id").read_text().strip()
        files = {p.name for p in (tmp_path / name / "wandb").glob("offline-run-*/run-*.wandb")}
        assert files == {f"run-{run_id}.wandb"}
    assert (tmp_path / "first" / "wandb_run_id").read_text() != (tmp_path / "second" / "wandb_run_id").read_text()


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def crash(checkpoint, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_last_checkpoint_holds_the_final_step_of_a_mid_epoch_stop(tmp_path: Path, train_recipe) -> None:
    run = train_recipe("vae/tiny", tmp_path / "mid", "trainer.max_steps=30", "trainer.max_epochs=null")
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 30  # 22 steps per epoch


def test_train_scalars_are_logged_on_logging_steps_only(tmp_path: Path, train_recipe) -> None:
    """`train/*` is computed into the log only where the loggers write (plus the first and last step):
    each `self.log` costs as much as a small network's forward pass."""
    run = train_recipe("quickstart", tmp_path / "q", "trainer.max_steps=23", "trainer.max_epochs=null",
                       "trainer.log_every_n_steps=10", "trainer.check_val_every_n_epoch=1000",
                       "trainer.resume=never", "logging.wandb=false")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == [9, 19]  # Lightning writes at steps 10 and 20 (numbered from 0 in the file)
    assert all("data/skipped_samples" in r for r in rows if "train/loss" in r)
