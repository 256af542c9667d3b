"""Recipes: every file validates; extends chains merge; bad keys, types and families fail with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from scalegen.config import load_config, resolved
from scalegen.config.loader import RECIPES_DIR
from scalegen.errors import ConfigError

RECIPES = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(RECIPES_DIR)) for p in RECIPES])
def test_every_recipe_validates(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert cfg.description, f"{recipe} needs a one-line description"
    assert recipe.read_text().startswith("#"), f"{recipe} needs a header comment (scale, reference result)"
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_extends_chain_and_override_order(tmp_path: Path) -> None:
    base = tmp_path / "parent.yaml"
    base.write_text("model: {family: vae, latent_dim: 4}\noptim: {lr: 0.5}\ntrainer: {max_epochs: 1}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\ndescription: child\noptim: {lr: 0.25}\n")
    cfg = load_config(child, ["model.latent_dim=7"])
    # override > child > parent > schema defaults
    assert (cfg.model.latent_dim, cfg.optim.lr, cfg.optim.name) == (7, 0.25, "adamw")


def test_resolved_config_has_no_interpolations() -> None:
    cfg = resolved(load_config("quickstart", ["data.root=/x/${data.dataset}"]))
    assert cfg.data.root == "/x/digits" and cfg.run.name == "quickstart"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.latnt_dim=3", ["unknown key 'model.latnt_dim'", "override 'model.latnt_dim=3'", "'latent_dim'"]),
        ("trainr.max_steps=3", ["unknown key 'trainr'", "Did you mean 'trainer'"]),
        ("model.latent_dim=abc", ["wrong type for 'model.latent_dim'", "expected int"]),
        ("model.family=vea", ["unknown model family 'vea'", "Did you mean 'vae'", "Valid names:"]),
        ("model.likelihood=poisson", ["model.likelihood='poisson'", "bernoulli, logistic, gaussian"]),
        ("trainer.precision=8-bit", ["trainer.precision='8-bit'", "bf16-mixed"]),
        ("noequals", ["is not key=value"]),
        ("model.hidden=[32,", ["override 'model.hidden=[32,'", "not valid YAML", "model.hidden=[256,128]"]),
        ("model.hidden={a", ["override 'model.hidden={a'", "not valid YAML"]),
    ],
)
def test_bad_overrides_name_the_problem(override: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", [override])
    for fragment in expected:
        assert fragment in str(err.value)


def test_bad_key_in_a_recipe_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: quickstart\noptim: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.learning_rate' in .*bad.yaml.*Valid names: .*lr"):
        load_config(bad)


def test_missing_recipe_suggests_names() -> None:
    with pytest.raises(ConfigError, match="recipe 'quickstrat' not found.*'quickstart'"):
        load_config("quickstrat")


def test_families_hold_their_sections_as_plain_dataclasses() -> None:
    """A family reads its settings in every training step: it gets the schema's dataclasses, not OmegaConf
    nodes (each of whose attribute reads costs ~10 us), with the recipe's values."""
    import dataclasses

    from omegaconf import DictConfig

    from scalegen.dataspec import DataSpec
    from scalegen.registry import get_family

    cfg = load_config("quickstart", ["model.beta=0.5", "optim.lr=0.01"])
    model = get_family("vae").module(cfg.model, cfg.optim, DataSpec())
    for section in (model.cfg, model.optim_cfg):
        assert dataclasses.is_dataclass(section) and not isinstance(section, DictConfig)
    assert model.cfg.beta == 0.5 and model.cfg.hidden == [256, 128] and model.optim_cfg.lr == 0.01
    assert type(model)(model.cfg, model.optim_cfg, model.data_spec).cfg == model.cfg  # rebuilt from a model
