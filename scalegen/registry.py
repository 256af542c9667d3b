"""The model-family registry: name -> (config schema, LightningModule class).

A family module calls `register_family` at import; `scalegen.families` imports every family module,
so the runtime never switches on family names.
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
    import scalegen.families  # noqa: F401  (registers the built-in families)

    if name not in _FAMILIES:
        raise ConfigError(f"unknown model family {name!r}.{did_you_mean(str(name), _FAMILIES)}")
    return _FAMILIES[name]


def families() -> dict[str, FamilyEntry]:
    import scalegen.families  # noqa: F401

    return dict(_FAMILIES)
