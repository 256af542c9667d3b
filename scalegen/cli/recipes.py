"""scalegen recipes"""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from scalegen.config.loader import RECIPES_DIR, recipe_chain

HELP = "list the recipes with their one-line descriptions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def describe(path) -> tuple[str, str]:
    """(family, description) of a recipe, following `extends:` for whichever it leaves out."""

    layers = recipe_chain(path.resolve())
    family = description = ""
    for _, layer in layers:
        family = OmegaConf.select(layer, "model.family", default=family)
    description = OmegaConf.select(layers[-1][1], "description", default="")
    return family, description


def run(args: argparse.Namespace) -> int:
    table = Table(title=f"recipes in {RECIPES_DIR}")
    for col in ("recipe", "family", "description"):
        table.add_column(col)
    for path in sorted(RECIPES_DIR.rglob("*.yaml")):
        name = str(path.relative_to(RECIPES_DIR).with_suffix(""))
        if name == "base":
            continue
        family, description = describe(path)
        table.add_row(name, family, description)
    Console(width=160).print(table)
    return 0
