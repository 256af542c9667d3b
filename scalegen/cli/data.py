"""`scalegen data prepare NAME --out DIR` and `scalegen data pack SRC --out DIR`: write WebDataset shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from scalegen.data import prepare_dataset
from scalegen.data.pack import pack_folder

HELP = "prepare a built-in dataset, or pack your own folder of images/audio, as WebDataset shards"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{prepare,pack}", required=True)
    p = sub.add_parser(
        "prepare",
        help="write a built-in dataset (digits, mnist, cifar10, fsdd) as shards",
        description="Download (checksum-verified) or read a local upstream copy, then write "
        "{split}-{index:06d}.tar shards and manifest.json. Re-running keeps verified shards.",
    )
    p.add_argument("name", help="digits, mnist, cifar10 or fsdd")
    p.add_argument("--out", required=True, type=Path, help="folder for the shards and manifest.json")
    p.add_argument(
        "--source",
        default=None,
        help="local copy in the upstream format (no download), e.g. a folder of MNIST .gz files",
    )
    p.add_argument("--shard-size", type=int, default=None, help="samples per shard (default: per dataset)")
    k = sub.add_parser(
        "pack",
        help="write your own folder (class_name/*.png|jpg|wav, or unlabelled) as shards",
        description="Pack SRC/class_name/*.{png,jpg,jpeg,wav} (labels from folder names) or a flat "
        "folder (unlabelled) into shards + manifest.json.",
    )
    k.add_argument("src", type=Path, help="folder of images or audio")
    k.add_argument("--out", required=True, type=Path, help="folder for the shards and manifest.json")
    k.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    k.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction as the val split")
    k.add_argument(
        "--test-fraction", type=float, default=0.0, help="hold out this fraction as the test split"
    )
    k.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    k.add_argument("--name", default=None, help="dataset name in the manifest (default: SRC's folder name)")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":

        manifest = prepare_dataset(args.name, args.out, source=args.source, shard_size=args.shard_size)
    else:

        manifest = pack_folder(
            args.src,
            args.out,
            shard_size=args.shard_size,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            name=args.name,
        )
    splits = ", ".join(f"{k} {v.count} in {len(v.shards)} shards" for k, v in manifest.splits.items())
    print(f"{manifest.name}: {splits} -> {args.out}/manifest.json")
    return 0
