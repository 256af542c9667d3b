"""Fixtures for the data pipeline tests: prepared digits shards (once per session) and the shared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scalegen.data import prepare_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn digits prepared as shards (train 1,347 in 3 shards of 500/500/347, val 150, test 300)."""
    root = tmp_path_factory.mktemp("digits")
    prepare_dataset("digits", root, progress=False)
    return root


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The shared dataset copies (MNIST, FSDD): $SCALEGEN_SHARED or ../shared/datasets next to the repo."""
    env = os.environ.get("SCALEGEN_SHARED")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "datasets", REPO.parents[1] / "shared" / "datasets"]
    for path in candidates:
        if (path / "README.md").is_file():
            return path
    looked = ", ".join(map(str, candidates))
    pytest.skip(f"shared datasets not found (looked in {looked}; set SCALEGEN_SHARED)")
