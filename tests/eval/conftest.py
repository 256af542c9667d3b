"""Fixtures for the evaluation tests: the shared MNIST copy and an isolated scalegen cache."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Weights, domain classifiers and reference statistics go to a per-session temporary cache."""
    cache = tmp_path_factory.getbasetemp() / "scalegen-cache"
    monkeypatch.setenv("SCALEGEN_CACHE", str(cache))
    monkeypatch.delenv("SCALEGEN_INCEPTION_WEIGHTS", raising=False)
    return cache
