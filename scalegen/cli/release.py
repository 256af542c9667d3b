"""scalegen release RUN_DIR --out DIR"""

from __future__ import annotations

import argparse

from scalegen.hub import make_release

HELP = "write a self-contained release of a run: safetensors (EMA and raw), recipe, model card, SHA256SUMS"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", help="run folder (its newest checkpoint), a checkpoint file, or a ZeRO folder"
    )
    parser.add_argument("--out", required=True, help="folder to write the release into")
    parser.add_argument(
        "--licence",
        "--license",
        dest="licence",
        default="Apache-2.0",
        help="licence of the weights, stated in the model card (default: Apache-2.0)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")


def run(args: argparse.Namespace) -> int:

    out = make_release(args.run_dir, args.out, licence=args.licence, overwrite=args.overwrite)
    print(f"release: {out}")
    return 0
