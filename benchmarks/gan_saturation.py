"""Why the non-saturating generator loss is the default: generator gradient magnitudes early in training.

On scikit-learn's 8x8 digits, a fresh DCGAN generator (the recipes/dcgan/tiny.yaml networks) is held
fixed while its discriminator (without batch norm) trains, as in the first steps of a run, when D
learns to reject G's unformed samples long before G improves (the protocol of Arjovsky & Bottou 2017,
Fig. 2). Every few D steps it measures, at the same (G, D), the norm of the generator's parameter
gradient of the minimax loss E log(1 - D(G(z))) (Goodfellow et al. 2014, eq. 1) and of the
non-saturating loss -E log D(G(z)) (their sec. 3), and the mean D(G(z)). The minimax gradient in the
logit is -D(G(z)), so it vanishes as D grows confident; the non-saturating one is -(1 - D(G(z))),
largest exactly then. Prints a table (mean over seeds) and `ratio: X`, the non-saturating over the
minimax gradient norm after the last D step; with --figure writes the curves.

    PYTHONPATH=. python benchmarks/gan_saturation.py [--seeds 5] [--d-steps 500] [--lr 1e-3] \
        [--figure docs/figures/gan_saturation.png]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits

from scalegen.dataspec import images_to_unit
from scalegen.nets.dcgan import Discriminator, Generator
from scalegen.objectives.gan import discriminator_loss, generator_loss


def digits() -> torch.Tensor:
    d = load_digits()
    return images_to_unit(torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:, None])


def grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params)
    return float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))


def run(seed: int, d_steps: int, checkpoints: list[int], data: torch.Tensor, lr: float) -> dict[str, list[float]]:
    torch.manual_seed(seed)
    # No batch norm in D: in train mode it would normalize an all-fake batch back to logits near 0.
    G, D = Generator(16, 1, 8, 16, "batch", 4), Discriminator(1, 8, 16, "none", 4)
    opt = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))  # betas of recipes/dcgan/tiny.yaml
    z_eval = torch.randn(256, 16)
    out: dict[str, list[float]] = {"minimax": [], "non_saturating": [], "d_fake": []}
    params = list(G.parameters())
    for step in range(d_steps + 1):
        if step in checkpoints:
            with torch.no_grad():
                out["d_fake"].append(float(torch.sigmoid(D(G(z_eval))).mean()))
            for kind in ("minimax", "non_saturating"):
                out[kind].append(grad_norm(generator_loss(D(G(z_eval)), kind), params))
        if step == d_steps:
            break
        real = data[torch.randint(len(data), (64,))]
        with torch.no_grad():
            fake = G(torch.randn(64, 16))
        loss = discriminator_loss(D(real), D(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--d-steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3, help="D's Adam learning rate (the recipe's 2e-4 "
                        "takes ~5x the steps to the same confidence)")
    parser.add_argument("--figure", default=None, help="write the curves to this PNG")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = digits()
    checkpoints = sorted({0, 2, 5, 10, 20, 50, 100, 200, args.d_steps} & set(range(args.d_steps + 1)))
    runs = [run(s, args.d_steps, checkpoints, data, args.lr) for s in range(args.seeds)]
    mean = {k: np.mean([r[k] for r in runs], 0) for k in runs[0]}
    print(f"{'D steps':>8} {'mean D(G(z))':>13} {'|grad| minimax':>15} {'|grad| non-sat':>15} {'ratio':>8}")
    for i, step in enumerate(checkpoints):
        ratio = mean["non_saturating"][i] / mean["minimax"][i]
        print(f"{step:>8} {mean['d_fake'][i]:>13.4f} {mean['minimax'][i]:>15.4g} {mean['non_saturating'][i]:>15.4g}"
              f" {ratio:>8.1f}")
    print(f"ratio: {mean['non_saturating'][-1] / mean['minimax'][-1]:.1f}")
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        x = np.maximum(checkpoints, 0.5)  # step 0 on a log axis
        ax.plot(x, mean["non_saturating"], marker="o", label="non-saturating  -log D(G(z))")
        ax.plot(x, mean["minimax"], marker="s", label="minimax  log(1 - D(G(z)))")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("discriminator steps (generator fixed; step 0 at 0.5)")
        ax.set_ylabel("generator gradient norm")
        ax.set_title(f"DCGAN on 8x8 digits, mean of {args.seeds} seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.figure, dpi=80)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
