"""Fixtures for the evaluation tests: the shared MNIST copy and an isolated scalegen cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The shared dataset copies (MNIST, FSDD): $SCALEGEN_SHARED or ../shared/datasets next to the repo."""
    env = os.environ.get("SCALEGEN_SHARED")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "datasets", REPO.parents[1] / "shared" / "datasets"]
    for path in candidates:
        if (path / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
            return path
    pytest.skip(f"shared datasets not found (looked in {', '.join(map(str, candidates))}; set SCALEGEN_SHARED)")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Weights, domain classifiers and reference statistics go to a per-session temporary cache."""
    cache = tmp_path_factory.getbasetemp() / "scalegen-cache"
    monkeypatch.setenv("SCALEGEN_CACHE", str(cache))
    monkeypatch.delenv("SCALEGEN_INCEPTION_WEIGHTS", raising=False)
    return cache
