"""Evaluation of every family that declares `classify`: accuracy, calibration (ECE, 15 bins, and a
reliability diagram) and out-of-distribution detection (AUROC) against built-in corruptions of the test
split. Also the AIS details of families whose `nll_kind` is "ais".

OOD scores, each higher = more in-distribution: `log_px` = -E(x) (families declaring `energy`, whose
`energy` accepts float images in [-1, 1]) or -nll(x) (families declaring `nll`); `grad_norm` =
-||grad_x log p(x)|| = -||dE/dx|| with x in [-1, 1] (Grathwohl et al. 2020, sec. 5.3; families declaring
`energy`); `max_softmax` = max_y p(y|x) (Hendrycks & Gimpel 2017), for every classifier.
The pure mathematics is in `scalegen.metrics.calibration` and `scalegen.metrics.ood`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from scalegen.config.schema import DataConfig
from scalegen.dataspec import images_to_unit
from scalegen.errors import UserError
from scalegen.eval.data import EvalData
from scalegen.metrics.calibration import calibration_bins, expected_calibration_error
from scalegen.metrics.ood import CORRUPTIONS, auroc, corrupt, match_images
from scalegen.samplers.langevin import energy_grad

CLASSIFIER_METRICS = ("accuracy", "ece", "ood")
ECE_BINS = 15

DEFINITIONS = {
    "accuracy": "fraction of labelled test examples whose argmax_y p(y|x) is the label",
    "ece": f"expected calibration error: sum over {ECE_BINS} equal-width bins of max_y p(y|x) of "
    "(n_bin / N) |accuracy_bin - confidence_bin| (Guo et al. 2017)",
    "ood": "AUROC of in-distribution test examples (positives) against a corrupted copy of them (negatives), "
    "for each score (log p(x) up to a constant, -||grad_x log p(x)||, max softmax) and corruption",
}


PerExample = Callable[..., Tensor]  # scalegen.eval.runner.per_example: (fn, x, y, batch_size, device) -> rows


def _scores(ev: Any, per_example: PerExample, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    model, levels = ev.model, ev.spec.levels
    bs, dev = ev.cfg.batch_size, ev.device
    out = {"max_softmax": per_example(lambda a, b: model.classify(a).max(1).values, x, y, bs, dev)}
    if "energy" in ev.caps:
        out["log_px"] = per_example(lambda a, b: -model.energy(images_to_unit(a, levels)), x, y, bs, dev)
        grad = lambda a, b: -energy_grad(model.energy, images_to_unit(a, levels)).flatten(1).norm(dim=1)  # noqa: E731
        out["grad_norm"] = per_example(grad, x, y, bs, dev)
    elif "nll" in ev.caps:
        out["log_px"] = per_example(lambda a, b: -model.nll(a, b), x, y, bs, dev)
    return out


def other_dataset(cfg: Any, shape: tuple[int, int, int]) -> tuple[str, Tensor]:
    """`eval.ood_data`'s images (its `ood_split`, first `ood_examples`) brought to the model's image shape."""
    folder = DataConfig(dataset=Path(cfg.ood_data).name, root=cfg.ood_data, prepare=False)  # never prepared here
    try:
        data = EvalData.from_config(OmegaConf.structured(folder))
        x, _ = data.split(cfg.ood_split, cfg.ood_examples)
    except (UserError, KeyError) as err:
        raise UserError(f"eval.ood_data={cfg.ood_data!r} (split {cfg.ood_split!r}): {err}") from None
    if data.spec.kind != "image":
        raise UserError(f"eval.ood_data={cfg.ood_data!r} holds {data.spec.kind} data; OOD detection needs images")
    return data.name, match_images(x, tuple(int(s) for s in shape))


def classifier_metrics(ev: Any, per_example: PerExample, all_by_default: bool) -> None:
    """Fill ev.results["accuracy" / "ece" / "ood"] (and ev.artifacts["reliability"]) for a classifier: the
    ones named in ev.metrics, or all three when `all_by_default` (no metric was named)."""
    names = [m for m in CLASSIFIER_METRICS if m in ev.metrics] or (list(CLASSIFIER_METRICS) if all_by_default else [])
    if not names:
        return
    if "classify" not in ev.caps:
        for m in names:
            if m in ev.metrics:
                ev._skip(m, "the family has no classifier")
        return
    x, y = ev._eval_split()
    keep = y >= 0
    x, y = x[keep], y[keep]
    if not len(y):
        for m in names:
            ev._skip(m, "the evaluation split has no labelled examples")
        return
    log_probs = per_example(lambda a, b: ev.model.classify(a).float(), x, y, ev.cfg.batch_size, ev.device)
    common = {"split": ev.cfg.split, "count": len(y)}
    if "accuracy" in names:
        acc = float((log_probs.argmax(1) == y).double().mean())
        ev.results["accuracy"] = {"value": acc, "quantity": "fraction of test examples whose argmax_y p(y|x) is "
                                  "the label", "definition": DEFINITIONS["accuracy"], **common}
    if "ece" in names:
        stats = calibration_bins(log_probs, y, ECE_BINS)
        ev.results["ece"] = {"value": expected_calibration_error(log_probs, y, ECE_BINS), "bins": ECE_BINS,
                             "quantity": f"expected calibration error, {ECE_BINS} equal-width confidence bins",
                             "bin_counts": stats["count"].tolist(), "bin_accuracy": stats["accuracy"].tolist(),
                             "bin_confidence": stats["confidence"].tolist(), "definition": DEFINITIONS["ece"],
                             **common}
        ev.artifacts["reliability"] = stats
    if "ood" in names:
        scores_in = _scores(ev, per_example, x, y)
        table: dict[str, dict[str, float]] = {}
        for kind in CORRUPTIONS:
            scores_out = _scores(ev, per_example, corrupt(x, kind, seed=ev.cfg.seed), y)
            table[kind] = {s: auroc(scores_in[s], scores_out[s]) for s in scores_in}
        if ev.ood_data is not None:
            name, x_out = ev.ood_data
            scores_out = _scores(ev, per_example, x_out, torch.zeros(len(x_out), dtype=torch.long))
            table[f"dataset:{name}"] = {s: auroc(scores_in[s], scores_out[s]) for s in scores_in}
        primary = "log_px" if "log_px" in scores_in else "max_softmax"
        ev.results["ood"] = {"value": sum(t[primary] for t in table.values()) / len(table), "score": primary,
                             "quantity": f"AUROC against corrupted test examples, score {primary}, mean over them",
                             "auroc": table, "definition": DEFINITIONS["ood"] + f"; value = mean AUROC of "
                             f"{primary} over the corruptions (and eval.ood_data)", **common}


def ais_details(ev: Any) -> None:
    """For nll_kind "ais": log Z, its standard error over the AIS runs and the settings, beside bits/dim
    (the family's documented `log_z_estimate()`), and the bits/dim standard error including log Z's."""
    entry = ev.results.get("bpd")
    if entry is None or ev.model.nll_kind != "ais":
        return
    est = ev.model.log_z_estimate()
    entry.update(est)
    entry["quantity"] = "AIS estimate of the negative log-likelihood (log Z by annealed importance sampling)"
    log2 = torch.log(torch.tensor(2.0)).item()
    se_log_z_bpd = est["log_z_stderr"] / (ev.spec.dims * log2)
    entry["sem_with_log_z"] = (entry["sem"] ** 2 + se_log_z_bpd**2) ** 0.5
    entry["nats"] = entry["value"] * ev.spec.dims * log2


def write_reliability(artifacts: dict, out_dir: Path) -> Path | None:
    """reliability.png: accuracy against confidence per bin, with the diagonal of perfect calibration."""
    stats = artifacts.get("reliability")
    if stats is None:
        return None
    import matplotlib  # optional heavy dependency, only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = stats["edges"].numpy()
    width = edges[1] - edges[0]
    filled = stats["count"].numpy() > 0
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(edges[:-1][filled], stats["accuracy"].numpy()[filled], width=width, align="edge", edgecolor="k",
           alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlabel("confidence max_y p(y|x)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "reliability.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
