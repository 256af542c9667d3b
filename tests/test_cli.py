"""The command line: help for every command, one-line errors with non-zero exit, recipes, sample."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from scalegen.cli.main import _commands, main

REPO = Path(__file__).resolve().parents[1]


def scalegen(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalegen", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: scalegen" in capsys.readouterr().out


def test_user_error_is_one_line_and_nonzero() -> None:
    out = scalegen("train", "quickstart", "model.latnt_dim=3")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'model.latnt_dim'" in lines[0] and "latent_dim" in lines[0]


def test_config_prints_resolved_yaml() -> None:
    out = scalegen("config", "quickstart", "optim.lr=0.01")
    assert out.returncode == 0, out.stderr
    assert "lr: 0.01" in out.stdout and "family: vae" in out.stdout and "${" not in out.stdout


def test_recipes_lists_descriptions(capsys: pytest.CaptureFixture) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "quickstart" in out and "8x8 digits" in out


def test_sample_writes_a_grid(trained_vae: Path, tmp_path: Path) -> None:
    out_png = tmp_path / "grid.png"
    assert main(["sample", str(trained_vae), "--n", "16", "--out", str(out_png)]) == 0
    img = Image.open(out_png)
    assert img.size[0] >= 8 * 4 and img.getextrema() != (0, 0)


def test_sample_missing_checkpoint_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sample", str(tmp_path / "nope.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_overrides_may_follow_options(capsys: pytest.CaptureFixture) -> None:
    args = ["slurm", "submit", "quickstart", "--nodes", "1", "--gpus-per-node", "0", "--dry-run"]
    assert main([*args, "trainer.max_steps=7", "optim.lr=0.01"]) == 0
    script = capsys.readouterr().out
    assert "trainer.max_steps=7" in script and "optim.lr=0.01" in script
    with pytest.raises(SystemExit) as exit_:  # an unknown option is still refused
        main([*args, "trainer.max_steps=7", "--bogus"])
    assert exit_.value.code == 2 and "--bogus" in capsys.readouterr().err


def test_a_command_leaves_the_process_group_before_exit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A rank that exits with its gloo group still alive can abort at interpreter exit (SIGABRT after the
    # run's work is done), so a command's ranks leave the group together once the command succeeds.
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["recipes"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
