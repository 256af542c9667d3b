"""User-facing errors: the CLI prints them as one line and exits non-zero, with no traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user (recipe, override, path). The message names the problem and the fix."""


class ConfigError(UserError):
    """A recipe or override that does not fit the typed schema."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The valid names closest to a misspelt one, best first."""
    return difflib.get_close_matches(name, sorted(candidates), n=n, cutoff=0.5)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    candidates = sorted(candidates)
    near = closest(name, candidates)
    hint = f" Did you mean {', '.join(repr(c) for c in near)}?" if near else ""
    return f"{hint} Valid names: {', '.join(candidates)}."
