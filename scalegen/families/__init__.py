"""Model families. Importing this package registers every family module in it."""

import importlib
import pkgutil

from scalegen.dataspec import DataSpec
from scalegen.families.base import GenerativeModel

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["DataSpec", "GenerativeModel"]
