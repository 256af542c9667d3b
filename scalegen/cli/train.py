"""scalegen train RECIPE [key=value ...]"""

from __future__ import annotations

import argparse

from lightning.pytorch.utilities import rank_zero_only

from scalegen.cli.common import add_recipe_arguments
from scalegen.config import load_config
from scalegen.runtime.train import train

HELP = "train a model from a recipe (the config is validated before anything starts)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)

    run_dir = train(cfg)
    rank_zero_only(print)(f"run folder: {run_dir}")  # once, not by every DDP process
    return 0
