"""Arguments shared by the subcommands that take a recipe."""

from __future__ import annotations

import argparse


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe file or name in recipes/ (e.g. quickstart, vae/mnist)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides in OmegaConf dotlist form, e.g. trainer.max_steps=100")
