"""Fixtures for the data pipeline tests: prepared digits shards (once per session) and the shared datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalegen.data import prepare_dataset


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn digits prepared as shards (train 1,347 in 3 shards of 500/500/347, val 150, test 300)."""
    root = tmp_path_factory.mktemp("digits")
    prepare_dataset("digits", root, progress=False)
    return root


