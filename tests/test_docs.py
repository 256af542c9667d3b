"""Docs that are generated from code stay in step with it."""

from __future__ import annotations

from pathlib import Path

from scalegen.config.reference import reference

REPO = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_current() -> None:
    doc = (REPO / "docs" / "recipe-reference.md").read_text()
    assert doc == reference(), "regenerate: python -m scalegen.config.reference > docs/recipe-reference.md"


def test_reference_lists_every_key() -> None:
    text = reference()
    for key in ("trainer.precision", "trainer.strategy", "data.batch_size", "optim.warmup_steps", "model.iwae_k",
                "checkpoint.monitor", "logging.mode", "ema.decay", "run.dir"):
        assert f"`{key}`" in text
