"""scalegen sample CKPT --n 64 --out grid.png

Also: `--class 3` / `--classes 0-9` (class-conditional families), `--levels` (one row per pyramid level
of a LAPGAN's samples, coarse to fine), and completion / inpainting with
`--complete IMAGES --mask SPEC --n K`: IMAGES is a PNG, a folder of PNGs or `test:N` (the first N
images of the checkpoint's own test split; any split name works); SPEC is `bottom`, `right`,
`box:x0,y0,x1,y1` (that box is missing; x1, y1 exclusive), `random:P` (each pixel missing with
probability P) or a mask PNG (white = missing). The grid's rows: the originals, the masked inputs
(missing pixels grey), then K completions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from scalegen.errors import UserError
from scalegen.eval.data import EvalData
from scalegen.plots import save_image_grid
from scalegen.registry import families
from scalegen.runtime import load_model
from scalegen.samplers.completion import repeat_each
from scalegen.samplers.wav import write_wavs

HELP = "draw samples (or completions of partly observed images) from a checkpoint into an image grid"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .ckpt file or a run folder (its newest checkpoint)")
    parser.add_argument("--n", type=int, default=64, help="number of samples (per class with --classes; "
                        "completions per image with --complete)")
    parser.add_argument("--out", default="samples.png",
                        help="output PNG (audio families: {stem}_000.wav, {stem}_001.wav, ... next to it)")
    parser.add_argument("--class", "--label", dest="label", type=int, default=None,
                        help="class to sample (class-conditional families)")
    parser.add_argument("--classes", default=None,
                        help="classes to sample, one grid row each: a range 0-9 or a list 1,3,7")
    parser.add_argument("--complete", default=None, metavar="IMAGES",
                        help="complete these images: a PNG, a folder of PNGs, or test:N (the checkpoint's test split)")
    parser.add_argument("--mask", default="bottom", metavar="SPEC",
                        help="missing pixels for --complete: bottom, right, box:x0,y0,x1,y1, random:P, or a mask "
                        "PNG (white = missing)")
    parser.add_argument("--levels", action="store_true",
                        help="pyramid families (lapgan): one grid row per level, coarse to fine, --n columns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="use the raw weights, not the EMA average")


def parse_classes(spec: str, num_classes: int) -> list[int]:
    """`0-9` or `1,3,7` -> class ids, each checked against the model's classes."""
    try:
        if "-" in spec:
            lo, hi = (int(v) for v in spec.split("-"))
            classes = list(range(lo, hi + 1))
        else:
            classes = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--classes {spec!r}: write a range like 0-9 or a list like 1,3,7") from None
    if not classes:
        raise UserError(f"--classes {spec!r} names no class")
    for c in classes:
        check_class(c, num_classes)
    return classes


def check_class(c: int, num_classes: int) -> None:
    if not 0 <= c < num_classes:
        raise UserError(f"class {c} is out of range: the model has classes 0..{num_classes - 1}")


def parse_mask(spec: str, shape: tuple[int, int, int], n: int, seed: int = 0) -> Tensor:
    """A mask [n or 1, 1, H, W], True = observed, from a SPEC (see the module docstring)."""
    _, h, w = shape
    known = torch.ones(1, 1, h, w, dtype=torch.bool)
    kind, _, arg = spec.partition(":")
    if spec == "bottom":
        known[..., h // 2:, :] = False
    elif spec == "right":
        known[..., :, w // 2:] = False
    elif kind == "box":
        try:
            x0, y0, x1, y1 = (int(v) for v in arg.split(","))
        except ValueError:
            raise UserError(f"--mask {spec!r}: write box:x0,y0,x1,y1 (pixel columns x, rows y)") from None
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise UserError(f"--mask {spec!r}: the box must lie inside the {w}x{h} image, x0 < x1 and y0 < y1")
        known[..., y0:y1, x0:x1] = False
    elif kind == "random":
        try:
            p = float(arg)
        except ValueError:
            raise UserError(f"--mask {spec!r}: write random:P with P the fraction missing, e.g. random:0.5") from None
        if not 0 < p < 1:
            raise UserError(f"--mask {spec!r}: the missing fraction must be in (0, 1)")
        g = torch.Generator().manual_seed(seed)
        known = torch.rand(n, 1, h, w, generator=g) >= p
    elif spec.lower().endswith(".png"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"--mask {spec!r}: no such mask PNG")
        img = np.asarray(Image.open(path).convert("L"))
        if img.shape != (h, w):
            raise UserError(f"--mask {spec}: the mask is {img.shape[1]}x{img.shape[0]}, the model's images {w}x{h}")
        known = torch.from_numpy(img < 128)[None, None]
    else:
        raise UserError(f"--mask {spec!r}: use bottom, right, box:x0,y0,x1,y1, random:P or a mask PNG")
    if known.all():
        raise UserError(f"--mask {spec!r} leaves no pixel missing")
    return known


def load_images(source: str, shape: tuple[int, int, int], data_cfg: object) -> tuple[Tensor, Tensor | None]:
    """uint8 images [B, C, H, W] (and their labels for a split) from a PNG, a folder or SPLIT:N."""
    c, h, w = shape
    split, _, count = source.partition(":")
    if count and not Path(source).exists():
        try:
            n = int(count)
        except ValueError:
            raise UserError(f"--complete {source!r}: write {split}:N with N a number of images") from None
        x, y = EvalData.from_config(data_cfg).split(split, n)
        return x, y
    path = Path(source)
    files = sorted(path.glob("*.png")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise UserError(f"--complete {source!r}: not a PNG, a folder of PNGs or SPLIT:N (e.g. test:8)")
    images = []
    for f in files:
        img = np.asarray(Image.open(f).convert("L" if c == 1 else "RGB"))
        if img.shape[:2] != (h, w):
            raise UserError(f"{f}: the image is {img.shape[1]}x{img.shape[0]}, the model's images are {w}x{h}")
        images.append(torch.from_numpy(img.reshape(h, w, c).copy()).permute(2, 0, 1))
    return torch.stack(images), None


def run_completion(args: argparse.Namespace, model: object, cfg: object) -> int:
    spec = model.data_spec  # type: ignore[attr-defined]
    if "complete" not in model.predictions:
        able = ", ".join(sorted(n for n, e in families().items() if "complete" in e.module.predictions))
        raise UserError(f"family {model.family_name!r} cannot complete images (families that can: {able})")  # type: ignore[attr-defined]
    shape = tuple(int(s) for s in spec.shape)
    x, y = load_images(args.complete, shape, cfg.data)  # type: ignore[attr-defined]
    mask = parse_mask(args.mask, shape, len(x), args.seed)
    num_labels = getattr(model, "num_labels", 0)
    if args.label is not None:
        if not num_labels:
            raise UserError(f"--class: this {model.family_name} model is not class-conditional")  # type: ignore[attr-defined]
        check_class(args.label, num_labels)
        y = torch.full((len(x),), args.label, dtype=torch.long)
    if num_labels and (y is None or bool((y < 0).any())):
        raise UserError("the model is class-conditional: give the images' class with --class K")
    if not num_labels:
        y = None
    torch.manual_seed(args.seed)
    # K completions of each image: the batch with each image repeated K times in a row, in one call.
    observed = mask.expand(len(x), *x.shape[1:])
    done = model.complete(repeat_each(x, args.n), repeat_each(observed, args.n), repeat_each(y, args.n))  # type: ignore[attr-defined]
    completions = done.cpu().view(len(x), args.n, *x.shape[1:])
    masked = torch.where(mask, x, torch.full_like(x, 128))  # missing pixels shown grey
    rows = torch.cat([x, masked, completions.transpose(0, 1).reshape(-1, *x.shape[1:])])
    print(f"wrote {save_image_grid(rows, args.out, nrow=len(x))}")
    return 0


def run_levels(args: argparse.Namespace, model: object) -> int:
    """Every level of a pyramid family's samples, each enlarged to the full size (nearest neighbour)."""
    if not getattr(type(model), "has_levels", False):  # a class-level declaration (families/lapgan.py)
        raise UserError(f"--levels: family {model.family_name!r} has no pyramid levels (lapgan has)")  # type: ignore[attr-defined]
    torch.manual_seed(args.seed)
    levels = model.sample_levels(args.n)  # type: ignore[attr-defined]
    size = levels[-1].shape[-1]
    rows = [x.repeat_interleave(size // x.shape[-1], -2).repeat_interleave(size // x.shape[-1], -1) for x in levels]
    print(f"wrote {save_image_grid(torch.cat(rows).cpu(), args.out, nrow=args.n)}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise UserError("--n must be at least 1")
    if args.classes is not None and args.label is not None:
        raise UserError("give --class or --classes, not both")
    model, cfg = load_model(args.checkpoint, use_ema=not args.raw)
    if args.complete is not None:
        return run_completion(args, model, cfg)
    if "sample" not in model.predictions:
        raise UserError(f"family {model.family_name!r} cannot sample")
    if args.levels:
        return run_levels(args, model)
    num_labels = getattr(model, "num_labels", 0)  # classes a class-conditional family conditions on
    nrow = None
    y = None
    if args.label is not None or args.classes is not None:
        if not num_labels:
            raise UserError(f"--class/--classes: this {model.family_name} model is not class-conditional "
                            "(train with a conditional recipe, e.g. recipes/vae/mnist-conditional.yaml)")
        if args.classes is not None:
            classes = parse_classes(args.classes, num_labels)
            y = torch.tensor(classes, dtype=torch.long).repeat_interleave(args.n)  # one grid row per class
            nrow = args.n
        else:
            check_class(args.label, num_labels)
            y = torch.full((args.n,), args.label, dtype=torch.long)
    torch.manual_seed(args.seed)
    samples = model.sample(args.n if y is None else len(y), None if y is None else y.to(model.device))
    if model.data_spec.kind == "audio":  # one 16-bit WAV per clip: {out stem}_000.wav, ...
        paths = write_wavs(args.out, samples, model.data_spec.sample_rate or 8000)
        print(f"wrote {len(paths)} WAV files: {paths[0]} ... {paths[-1]}")
        return 0
    print(f"wrote {save_image_grid(samples, args.out, nrow=nrow)}")
    return 0
