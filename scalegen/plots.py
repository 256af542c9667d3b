"""Figures a person reads: image grids and training curves (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 0) -> np.ndarray:
    """uint8 [N, C, H, W] -> one uint8 HxWxC (or HxW) array, `nrow` images a row, upscaled to >= 256 px wide."""
    images = images.detach().cpu()
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 128, np.uint8)
    for i, img in enumerate(images.numpy()):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = \
            img.transpose(1, 2, 0)
    scale = scale or max(1, 256 // grid.shape[1])
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid[..., 0] if c == 1 else grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, nrow)).save(path)
    return path


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (a partly written last line is ignored)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def save_curves(metrics_file: str | Path, path: str | Path, keys: tuple[str, ...] = ("train/loss", "val/loss"),
                title: str = "loss") -> Path | None:
    """Plot each key of a metrics.jsonl against the step; None when none of them was logged."""
    import matplotlib  # heavy: only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_file)
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = False
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 30 else None)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def save_bar_chart(labels: list[str], values: list[float], errors: list[float], path: str | Path, ylabel: str,
                   title: str = "") -> Path:
    """One bar per label with +-error bars (e.g. the inference gaps with their standard errors)."""
    import matplotlib  # heavy: only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(labels, values, yerr=errors, capsize=4, color=["C0", "C1", "C2", "C3"][: len(labels)])
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
