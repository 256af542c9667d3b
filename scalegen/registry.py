"""The model-family registry: name -> (config schema, LightningModule class).

A family module calls `register_family` at import. This module imports nothing but the errors, so the
config loader (below the families) can look a family's schema up here; the families are registered by
importing `scalegen.families`, which the layers above them (runtime, eval, hub, cli) do at their top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scalegen.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class FamilyEntry:
    name: str
    config: type  # dataclass subclassing scalegen.config.schema.ModelConfig
    module: type  # scalegen.families.base.GenerativeModel subclass
    summary: str


_FAMILIES: dict[str, FamilyEntry] = {}


def register_family(name: str, config: type, summary: str = ""):
    """Class decorator registering a GenerativeModel subclass under `name` with its config schema."""

    def wrap(module: type) -> type:
        if name in _FAMILIES and _FAMILIES[name].module is not module:
            raise RuntimeError(f"family {name!r} registered twice")
        _FAMILIES[name] = FamilyEntry(name, config, module, summary or (module.__doc__ or "").split("\n")[0])
        module.family_name = name
        return module

    return wrap


def get_family(name: Any) -> FamilyEntry:
    if name not in _FAMILIES:
        hint = did_you_mean(str(name), _FAMILIES) if _FAMILIES else (
            " No family is registered yet: import scalegen.families first.")
        raise ConfigError(f"unknown model family {name!r}.{hint}")
    return _FAMILIES[name]


def families() -> dict[str, FamilyEntry]:
    return dict(_FAMILIES)
