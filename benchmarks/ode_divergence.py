"""The ODE likelihood's divergence estimators against the exact divergence, on a trained `ddpm/tiny`.

Trains `recipes/ddpm/tiny.yaml` for its one epoch on the 8x8 digits (D = 64) into a temporary folder,
then solves the probability-flow ODE likelihood (`scalegen.objectives.ode_likelihood.ode_nll`, dopri5 at
rtol = atol = 1e-5, the same dequantization noise for every estimator) of the first `--images` test
images with the exact divergence and with Hutchinson's estimate (1 and 8 Rademacher probes, 1 Gaussian
probe). Prints, per estimator, the largest per-image difference from the exact bits/dim, the mean, and the
seconds; the last line is `ratio: X`, the exact divergence's time over one Rademacher probe's.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/ode_divergence.py [--images 4]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import scalegen.families  # noqa: E402,F401  (registers the families)
from scalegen.checkpoints import load_model  # noqa: E402
from scalegen.config import load_config  # noqa: E402
from scalegen.eval.data import EvalData  # noqa: E402
from scalegen.objectives.ode_likelihood import example_noise, ode_nll  # noqa: E402
from scalegen.runtime.train import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("ddpm/tiny", [f"run.dir={tmp}", "run.name=ddpm", "trainer.progress_bar=false"])
        run = train(cfg)
        model, cfg = load_model(run / "checkpoints" / "last.ckpt")
    model.eval()
    x, _ = EvalData.from_config(cfg.data).split("test", args.images)
    dims, levels = model.data_spec.dims, model.data_spec.levels
    index = torch.arange(len(x))
    u, _ = example_noise(index, model.data_spec.shape, seed=0)
    field = lambda xt, t: model.velocity(xt, t)  # noqa: E731

    def bpd(probes: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        t0 = time.process_time()
        nll = ode_nll(field, x, levels, u, probes=probes)
        return nll / (dims * math.log(2)), time.process_time() - t0

    exact, t_exact = bpd(None)
    rows = [("exact divergence", exact, t_exact)]
    for k, kind in ((1, "rademacher"), (8, "rademacher"), (1, "gaussian")):
        _, probes = example_noise(index, model.data_spec.shape, seed=0, num_probes=k, probe=kind)
        value, seconds = bpd(probes)
        rows.append((f"Hutchinson, {k} {kind}", value, seconds))
    print(f"{'estimator':<26} {'mean bits/dim':>14} {'max |diff| per image':>21} {'CPU s':>8}")
    for name, value, seconds in rows:
        print(f"{name:<26} {value.mean().item():>14.3f} {(value - exact).abs().max().item():>21.3f} {seconds:>8.1f}")
    print(f"ratio: {t_exact / rows[1][2]:.1f}")


if __name__ == "__main__":
    main()
