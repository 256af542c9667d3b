"""scalegen finetune RELEASE [RECIPE] [key=value ...]"""

from __future__ import annotations

import argparse

from lightning.pytorch.utilities import rank_zero_only

from scalegen.config import load_config
from scalegen.errors import UserError
from scalegen.hub import fetch_release
from scalegen.hub.load import release_info
from scalegen.runtime.train import train

HELP = "train a recipe starting from a release (folder, file:// or https:// URL; checksums verified)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "release", help="release folder, file:// URL or https:// URL (downloaded once, cached)"
    )
    parser.add_argument("recipe", nargs="?", default=None,
                        help="recipe file or name in recipes/ (same model family as the release); "
                             "default: the recipe the release was trained with (its config.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. 'finetune.reinit=[decoder.out.*]' trainer.max_steps=500",
    )


def run(args: argparse.Namespace) -> int:
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is None or "=" in recipe:  # no recipe named (argparse took the first override for it)
        overrides = [recipe, *overrides] if recipe else overrides
        recipe = str(fetch_release(args.release) / "config.yaml")  # a pin in the overrides is checked below
    cfg = load_config(recipe, [*overrides, f"finetune.init_from={args.release}"])
    folder = fetch_release(args.release, cfg.finetune.sha256)  # verify (and download) before anything trains
    family = release_info(folder)["family"]
    if family != cfg.model.family:
        raise UserError(
            f"release {args.release} is a {family!r} model but the recipe trains {cfg.model.family!r}; "
            f"use a {family} recipe"
        )
    run_dir = train(cfg)
    rank_zero_only(print)(f"run folder: {run_dir}")  # once, not by every DDP process
    return 0
