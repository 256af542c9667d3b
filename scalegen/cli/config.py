"""scalegen config RECIPE [key=value ...]"""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf

from scalegen.cli.common import add_recipe_arguments
from scalegen.config import load_config, resolved

HELP = "print a recipe's resolved, validated config as YAML"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)


def run(args: argparse.Namespace) -> int:
    print(OmegaConf.to_yaml(resolved(load_config(args.recipe, args.overrides))), end="")
    return 0
