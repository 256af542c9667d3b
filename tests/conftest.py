"""Session-wide test set-up: data prepared into a temporary folder, W&B offline, and a trained VAE."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports scalegen: built-in datasets are prepared into a per-session folder (inherited by
# subprocesses), and W&B never touches the network.
os.environ.setdefault("SCALEGEN_DATA", tempfile.mkdtemp(prefix="scalegen-test-data-"))
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
QUIET = ["trainer.progress_bar=false", "logging.wandb=false"]

import scalegen.families  # noqa: E402, F401  (registers the built-in families: tests call the config loader)


def _train_recipe(recipe: str, run_dir: Path, *overrides: str) -> Path:
    """Train a recipe in this process into `run_dir` (quiet: no progress bar, no W&B unless overridden)."""
    from scalegen.config import load_config
    from scalegen.runtime.train import train

    cfg = load_config(recipe, [f"run.dir={run_dir.parent}", f"run.name={run_dir.name}", *QUIET, *overrides])
    return train(cfg)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: the nets are tiny and 2 shared cores oversubscribe (up to 30x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The shared dataset copies (MNIST, FSDD): $SCALEGEN_SHARED or ../shared/datasets next to the repo."""
    env = os.environ.get("SCALEGEN_SHARED")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "datasets", REPO.parents[1] / "shared" / "datasets"]
    for path in candidates:
        if (path / "README.md").is_file():
            return path
    pytest.skip(f"shared datasets not found (looked in {', '.join(map(str, candidates))}; set SCALEGEN_SHARED)")


@pytest.fixture(scope="session")
def train_recipe():
    """`train_recipe(recipe, run_dir, *overrides) -> run_dir`: a real training run in this process."""
    return _train_recipe


@pytest.fixture(scope="session")
def trained_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart VAE trained for a few epochs (shared by the tests that need a trained model)."""
    return _train_recipe("quickstart", tmp_path_factory.mktemp("runs") / "vae", "trainer.max_epochs=12")
