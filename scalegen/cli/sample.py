"""scalegen sample CKPT --n 64 --out grid.png"""

from __future__ import annotations

import argparse

import torch

from scalegen.errors import UserError
from scalegen.plots import save_image_grid
from scalegen.runtime import load_model
from scalegen.samplers.wav import write_wavs

HELP = "draw samples from a checkpoint (or run folder) into an image grid"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .ckpt file or a run folder (its newest checkpoint)")
    parser.add_argument("--n", type=int, default=64, help="number of samples")
    parser.add_argument("--out", default="samples.png",
                        help="output PNG (audio families: {stem}_000.wav, {stem}_001.wav, ... next to it)")
    parser.add_argument("--label", type=int, default=None, help="class to sample (conditional families)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="use the raw weights, not the EMA average")


def run(args: argparse.Namespace) -> int:

    if args.n < 1:
        raise UserError("--n must be at least 1")
    model, _ = load_model(args.checkpoint, use_ema=not args.raw)
    if "sample" not in model.predictions:
        raise UserError(f"family {model.family_name!r} cannot sample")
    torch.manual_seed(args.seed)
    y = None if args.label is None else torch.full((args.n,), args.label, dtype=torch.long)
    samples = model.sample(args.n, y)
    if model.data_spec.kind == "audio":  # one 16-bit WAV per clip: {out stem}_000.wav, ...

        paths = write_wavs(args.out, samples, model.data_spec.sample_rate or 8000)
        print(f"wrote {len(paths)} WAV files: {paths[0]} ... {paths[-1]}")
        return 0
    print(f"wrote {save_image_grid(samples, args.out)}")
    return 0
