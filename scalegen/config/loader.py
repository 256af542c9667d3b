"""defaults <- recipe chain (`extends:`) <- command-line overrides, validated at every layer.

Each layer is merged on its own so an error can name the file or override it came from.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from scalegen.config.schema import Config
from scalegen.errors import ConfigError, did_you_mean
from scalegen.registry import get_family

RECIPES_DIR = Path(os.environ.get("SCALEGEN_RECIPES", Path(__file__).resolve().parents[2] / "recipes"))


def find_recipe(name: str | Path) -> Path:
    """A recipe by path, or by name in the recipes folder (`quickstart` or `vae/mnist`)."""
    path = Path(name)
    candidates = [path, path.with_suffix(".yaml"), RECIPES_DIR / path, (RECIPES_DIR / path).with_suffix(".yaml")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    known = [str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml")]
    raise ConfigError(f"recipe {str(name)!r} not found (looked in {RECIPES_DIR}).{did_you_mean(str(name), known)}")


def recipe_chain(path: Path, _seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """[(source, layer)] from the root base recipe to `path`, following `extends:`."""
    if path in _seen:
        raise ConfigError(f"recipe {path} extends itself (cycle: {' -> '.join(map(str, _seen + (path,)))})")
    try:
        layer = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry line numbers
        raise ConfigError(f"cannot parse recipe {path}: {err}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"recipe {path} must be a mapping of sections, not {type(layer).__name__}")
    parents: list[tuple[str, DictConfig]] = []
    base = layer.pop("extends", None)
    if base is not None:
        base_path = (path.parent / base) if (path.parent / base).is_file() else find_recipe(base)
        parents = recipe_chain(Path(base_path).resolve(), _seen + (path,))
    return parents + [(str(path), layer)]


def _family_of(layers: Sequence[tuple[str, DictConfig]]) -> Any:
    family = None
    for _, layer in layers:
        family = OmegaConf.select(layer, "model.family", default=family)
    if family is None:
        raise ConfigError("no model family: set model.family in the recipe or as an override (model.family=vae)")
    return family


def _schema_keys(node: Any, key: str) -> list[str]:
    """Valid child names at the parent of the dotted `key`, for a helpful error."""
    parent_path = key.rsplit(".", 1)[0] if "." in key else ""
    parent = OmegaConf.select(node, parent_path) if parent_path else node
    return list(parent.keys()) if isinstance(parent, DictConfig) else []


def _merge(cfg: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, layer)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as err:
        key = err.full_key or str(err.key)
        name = key.rsplit(".", 1)[-1]
        raise ConfigError(f"unknown key {key!r} in {source}.{did_you_mean(name, _schema_keys(cfg, key))}") from None
    except ValidationError as err:
        expected = ""
        if err.full_key:
            try:
                expected = type(OmegaConf.select(cfg, err.full_key)).__name__
            except OmegaConfBaseException:
                pass
        msg = str(err).splitlines()[0]
        raise ConfigError(
            f"wrong type for {err.full_key!r} in {source}: {msg}"
            + (f" (expected {expected})" if expected and expected != "NoneType" else "")
        ) from None


def _check_choices(schema_obj: Any, node: DictConfig, prefix: str = "") -> None:
    for f in dataclasses.fields(schema_obj):
        value = node.get(f.name)
        key = f"{prefix}{f.name}"
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(f.metadata['choices'])}")
        sub = getattr(schema_obj, f.name)
        if dataclasses.is_dataclass(sub) and isinstance(value, DictConfig):
            _check_choices(sub, value, key + ".")


def schema_for(family: str) -> DictConfig:
    """The full typed schema with `model` set to the family's config."""
    entry = get_family(family)
    cfg = OmegaConf.structured(Config(model=entry.config()))
    OmegaConf.set_struct(cfg, True)
    return cfg


def load_config(recipe: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Resolve a recipe and `key=value` overrides into a validated config (interpolations kept)."""
    layers = recipe_chain(find_recipe(recipe))
    override_layers = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example trainer.max_steps=100)")
        override_layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
    family = _family_of(layers + override_layers)
    cfg = schema_for(family)
    for source, layer in layers + override_layers:
        cfg = _merge(cfg, layer, source)
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve the config: {str(err).splitlines()[0]}") from None
    _check_choices(Config(model=get_family(family).config()), cfg)
    return cfg


def resolved(cfg: DictConfig) -> DictConfig:
    """A copy with every interpolation resolved (what is saved with a run)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    return out


def plain(section: Any) -> Any:
    """A config section as its schema's dataclass, unchanged if it is one already. For code that reads its
    settings in every training step: a DictConfig attribute read costs ~10 us of validation."""
    return OmegaConf.to_object(section) if isinstance(section, DictConfig) else section


def config_from_container(data: dict) -> DictConfig:
    """Rebuild a typed config from a saved (resolved) plain dict, e.g. a checkpoint's."""
    cfg = schema_for(data["model"]["family"])
    return _merge(cfg, OmegaConf.create(data), "saved config")


def run_dir_of(cfg: DictConfig) -> Path:
    """The run folder of a config: `run.dir / run.name`."""
    return Path(os.path.expanduser(cfg.run.dir)) / cfg.run.name
