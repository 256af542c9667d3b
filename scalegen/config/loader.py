"""defaults <- recipe chain (`extends:`) <- command-line overrides, validated at every layer.

Each layer is merged on its own so an error can name the file or override it came from: unknown keys,
wrong types and out-of-range numbers (the `ranged` bounds in the schema) are refused layer by layer;
choices, bounds that name another field, and combinations that cannot work are checked once the whole
config is resolved, naming where each value involved came from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from scalegen.config.schema import Config, describe_range
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
        raise ConfigError(f"cannot parse recipe {path}: {' '.join(str(err).split())}") from None
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


def _check_choices(schema_obj: Any, node: DictConfig, source_of: Callable[[str], str], prefix: str = "") -> None:
    for f in dataclasses.fields(schema_obj):
        value = node.get(f.name)
        key = f"{prefix}{f.name}"
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{key}={value!r} (from {source_of(key)}) is not allowed; choose one of "
                              f"{', '.join(f.metadata['choices'])}")
        sub = getattr(schema_obj, f.name)
        if dataclasses.is_dataclass(sub) and isinstance(value, DictConfig):
            _check_choices(sub, value, source_of, key + ".")


# ---- ranges and combinations -----------------------------------------------------------------------
def field_ranges(schema_obj: Any, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Dotted key -> `ranged` bounds, for every ranged field of a schema instance and its sections."""
    out: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(schema_obj):
        sub = getattr(schema_obj, f.name)
        if dataclasses.is_dataclass(sub):
            out.update(field_ranges(sub, f"{prefix}{f.name}."))
        elif "range" in f.metadata:
            out[f"{prefix}{f.name}"] = f.metadata["range"]
    return out


_HOLDS: dict[str, Callable[[Any, Any], bool]] = {
    "ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b,
}


def range_problem(key: str, value: Any, bounds: dict[str, Any], section: dict | None = None) -> str | None:
    """Why `value` is outside `bounds` ("must be >= 1"), or None when it is inside. None values pass; a list
    is checked element by element. A bound naming a sibling field is read from `section` (the resolved
    section dict) and skipped without one."""
    resolved = {}
    for op, bound in bounds.items():
        if isinstance(bound, str):
            if section is None or section.get(bound) is None:
                continue
            prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
            resolved[op] = (section[bound], f"{prefix}{bound}={section[bound]}")
        else:
            resolved[op] = (bound, bound)
    shown = describe_range({op: label for op, (_, label) in resolved.items()})
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        inside = all(_HOLDS[op](v, b) for op, (b, _) in resolved.items())  # NaN fails every comparison
        if not inside or not math.isfinite(v):
            rule = f"be {shown}" + ("" if math.isfinite(v) or shown == "finite" else " and finite")
            return f"each element must {rule}" if items is value else f"must {rule}"
    return None


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain nested dict (lists are leaves)."""
    if not isinstance(node, dict):
        return [(prefix, node)]
    out = []
    for k, v in node.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return out


def _is_interpolation(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(map(_is_interpolation, value))
    return isinstance(value, str) and "${" in value


def _check_layer_ranges(cfg: DictConfig, layer: DictConfig, source: str, ranges: dict[str, dict]) -> None:
    """Refuse an out-of-range number as soon as the layer that sets it is merged (interpolations wait for
    the resolved config)."""
    for key, raw in _leaves(OmegaConf.to_container(layer, resolve=False)):
        if key not in ranges or _is_interpolation(raw):
            continue
        value = OmegaConf.select(cfg, key)  # typed by the schema: an int given to a float field is a float
        value = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
        problem = range_problem(key, value, {op: b for op, b in ranges[key].items() if not isinstance(b, str)})
        if problem:
            raise ConfigError(f"{key}={value!r} (from {source}) is out of range: {problem}")


class _Sources:
    """Which layer set each key last, for errors about the resolved config."""

    def __init__(self, layers: Sequence[tuple[str, DictConfig]], unset: str = "the schema default") -> None:
        self.keys = [(source, {k for k, _ in _leaves(OmegaConf.to_container(layer, resolve=False))})
                     for source, layer in layers]
        self.unset = unset

    def __call__(self, key: str) -> str:
        for source, keys in reversed(self.keys):
            if key in keys or any(key.startswith(k + ".") for k in keys):
                return source
        return self.unset


def _get(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _check_resolved_ranges(final: dict, ranges: dict[str, dict], source_of: Callable[[str], str]) -> None:
    for key, bounds in ranges.items():
        parent = _get(final, key.rsplit(".", 1)[0]) if "." in key else final
        value = _get(final, key)
        problem = range_problem(key, value, bounds, parent if isinstance(parent, dict) else None)
        if problem:
            raise ConfigError(f"{key}={value!r} (from {source_of(key)}) is out of range: {problem}")


def _check_combinations(final: dict, source_of: Callable[[str], str]) -> None:
    """Settings that are each in range but cannot work together."""

    def said(key: str) -> str:
        value = _get(final, key)
        return f"{key}={'null' if value is None else repr(value)} (from {source_of(key)})"

    ck, trainer, data, optim = final["checkpoint"], final["trainer"], final["data"], final["optim"]
    if (ck["every_n_train_steps"] or 0) >= 1 and (ck["every_n_epochs"] or 0) >= 1:
        raise ConfigError(f"{said('checkpoint.every_n_train_steps')} and {said('checkpoint.every_n_epochs')} "
                          "cannot both be set (Lightning checkpoints on one schedule); set one of them to null")
    if trainer["max_steps"] == -1 and trainer["max_epochs"] is None:
        raise ConfigError(f"{said('trainer.max_steps')} and {said('trainer.max_epochs')} leave the run without a "
                          "length: set trainer.max_steps=N or trainer.max_epochs=N (-1 = until stopped)")
    if data["resampled"] and trainer["max_steps"] == -1:
        raise ConfigError(f"{said('data.resampled')} is an endless stream (an epoch never ends) but "
                          f"{said('trainer.max_steps')}: set trainer.max_steps=N")
    if optim["scale_lr"] != "none" and optim["reference_batch_size"] == 0:
        raise ConfigError(f"{said('optim.scale_lr')} needs the global batch the lr was tuned for, but "
                          f"{said('optim.reference_batch_size')}: set optim.reference_batch_size=N")
    if data["mu_law"] == 1:
        raise ConfigError(f"{said('data.mu_law')}: mu-law needs at least 2 levels (0 = no quantization)")
    limit = trainer["limit_val_batches"]
    if limit is not None and limit > 1 and limit != int(limit):
        raise ConfigError(f"{said('trainer.limit_val_batches')} is out of range: must be a fraction in [0, 1] or "
                          "a whole number of batches")
    devices = trainer["devices"]
    as_int = int(devices) if isinstance(devices, str) and devices.strip().lstrip("-").isdigit() else devices
    if isinstance(as_int, int) and not isinstance(as_int, bool) and as_int < 1 and as_int != -1:
        raise ConfigError(f"{said('trainer.devices')} is out of range: must be >= 1, -1 (all) or 'auto'")


def _schema_object(family: Any) -> Config:
    """`Config()` with `model` set to the family's schema dataclass."""
    return Config(model=get_family(family).config())


def schema_for(family: str) -> DictConfig:
    """The full typed schema with `model` set to the family's config."""
    cfg = OmegaConf.structured(_schema_object(family))
    OmegaConf.set_struct(cfg, True)
    return cfg


def load_config(recipe: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Resolve a recipe and `key=value` overrides into a validated config (interpolations kept)."""
    layers = recipe_chain(find_recipe(recipe))
    override_layers = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example trainer.max_steps=100)")
        try:
            layer = OmegaConf.from_dotlist([item])
        except (yaml.YAMLError, OmegaConfBaseException) as err:  # e.g. a list the shell split at its spaces
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); write a list without "
                              "spaces or quote the whole override (model.hidden=[256,128] or "
                              "'model.hidden=[256, 128]')") from None
        override_layers.append((f"override {item!r}", layer))
    family = _family_of(layers + override_layers)
    cfg = schema_for(family)
    schema_obj = _schema_object(family)
    ranges = field_ranges(schema_obj)
    for source, layer in layers + override_layers:
        cfg = _merge(cfg, layer, source)
        _check_layer_ranges(cfg, layer, source, ranges)
    try:
        final = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve the config: {str(err).splitlines()[0]}") from None
    source_of = _Sources(layers + override_layers)
    _check_choices(schema_obj, cfg, source_of)
    _check_resolved_ranges(final, ranges, source_of)  # type: ignore[arg-type]
    _check_combinations(final, source_of)  # type: ignore[arg-type]
    return cfg


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """`key=value` overrides on a loaded config (e.g. a checkpoint's, for `scalegen eval`), each checked
    against the schema and its ranges like a recipe's."""
    ranges = field_ranges(_schema_object(cfg.model.family))
    layers = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example eval.iwae_k=100)")
        layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
        cfg = _merge(cfg, layers[-1][1], layers[-1][0])
        _check_layer_ranges(cfg, layers[-1][1], layers[-1][0], ranges)
    if layers:  # bounds that name another field (model.sample_steps <= model.timesteps)
        final = OmegaConf.to_container(cfg, resolve=True)
        _check_resolved_ranges(final, ranges, _Sources(layers, "the saved config"))  # type: ignore[arg-type]
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
    """Rebuild a typed config from a saved (resolved) plain dict, e.g. a checkpoint's.

    Keys the schema no longer has (an option removed since the checkpoint was written, such as
    `data.prefetch`) are dropped with a warning naming them, so older checkpoints keep loading; any other
    mismatch is an error."""
    cfg = schema_for(data["model"]["family"])
    saved = OmegaConf.create(data)
    obsolete = _obsolete_keys(cfg, saved)
    for key in obsolete:
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(saved, parent) if parent else saved
        node.pop(name)
    if obsolete:
        warnings.warn(f"saved config: ignoring keys this version no longer has: {', '.join(obsolete)}", stacklevel=2)
    return _merge(cfg, saved, "saved config")


def _obsolete_keys(schema: DictConfig, saved: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key in saved.keys():
        if key not in schema:
            out.append(f"{prefix}{key}")
        elif isinstance(saved[key], DictConfig) and isinstance(schema[key], DictConfig):
            out += _obsolete_keys(schema[key], saved[key], f"{prefix}{key}.")
    return out


def run_dir_of(cfg: DictConfig) -> Path:
    """The run folder of a config: `run.dir / run.name`."""
    return Path(os.path.expanduser(cfg.run.dir)) / cfg.run.name
