"""metrics.json, report.md and the report's PNG figures (rank 0 only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scalegen.eval.classifier import write_reliability
from scalegen.plots import save_bar_chart, save_curves, save_image_grid

ORDER = (
    "bpd",
    "bpd_elbo",
    "bpd_ode",
    "fid",
    "kid",
    "is",
    "domain_fid",
    "domain_kid",
    "domain_is",
    "precision",
    "recall",
    "density",
    "coverage",
    "domain_precision",
    "domain_recall",
    "domain_density",
    "domain_coverage",
    "linear_probe",
    "semisup",
)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_report(
    results: dict,
    artifacts: dict,
    out: Path,
    run_dir: Path | None = None,
    spec: Any = None,
    log_wandb: bool = True,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(results, artifacts, out, run_dir, spec)
    results["figures"] = {k: str(v.name) for k, v in figures.items()}
    (out / "metrics.json").write_text(json.dumps(nan_to_none(results), indent=1) + "\n")
    (out / "report.md").write_text(markdown(results, figures))
    if log_wandb:
        log_to_wandb(results, figures)


def write_figures(
    results: dict, artifacts: dict, out: Path, run_dir: Path | None, spec: Any
) -> dict[str, Path]:
    figs: dict[str, Path] = {}
    samples = artifacts.get("samples")
    if samples is not None and len(samples):
        if samples.dtype == torch.uint8 and samples.dim() == 4:
            figs["samples"] = save_image_grid(samples[:64], out / "samples.png", nrow=8)
        elif samples.dim() == 3:
            figs["samples"] = _waveforms(samples[:8], out / "samples.png", getattr(spec, "sample_rate", None))
    rec = artifacts.get("reconstructions")
    if rec is not None and rec[0].dim() == 4:
        x, r = rec
        figs["reconstructions"] = save_image_grid(
            torch.cat([x, r.to(x.dtype)]), out / "reconstructions.png", nrow=len(x)
        )
    reliability = write_reliability(artifacts, out)
    if reliability is not None:
        figs["reliability"] = reliability
    for name, (images, nrow) in artifacts.get("extra_figures", {}).items():  # the family's own figures
        figs[name] = save_image_grid(images, out / f"{name}.png", nrow=nrow)
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        keys = ("val/bpd", "eval/bpd", "eval/bpd_elbo", "eval/bpd_ode")
        path = save_curves(run_dir / "metrics.jsonl", out / "bpd_curve.png", keys=keys, title="bits/dim")
        if path is not None:
            figs["bpd_curve"] = path
    semi = results["metrics"].get("semisup")
    if semi is not None:
        figs["probe_accuracy"] = _probe_figure(results, out / "probe_accuracy.png")
    gap = results["metrics"].get("inference_gap")
    if gap is not None:
        parts = ("approximation_gap", "amortization_gap")
        figs["inference_gap"] = save_bar_chart(
            ["approximation", "amortization"], [gap[p]["mean"] for p in parts], [gap[p]["sem"] for p in parts],
            out / "inference_gap.png", "nats per example", f"inference gaps ({gap['count']} examples)")
    return figs


def _waveforms(x: torch.Tensor, path: Path, sample_rate: int | None) -> Path:
    import matplotlib  # heavy: only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(x), 1, figsize=(8, 1.2 * len(x)), sharex=True)
    for ax, w in zip(list(axes) if len(x) > 1 else [axes], x):
        ax.plot(w.float().flatten().numpy(), lw=0.5)
        ax.set_yticks([])
    fig.supxlabel(f"sample index ({sample_rate} Hz)" if sample_rate else "sample index")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _probe_figure(results: dict, path: Path) -> Path:
    import matplotlib  # heavy: only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    semi = results["metrics"]["semisup"]
    full = results["metrics"].get("linear_probe", {}).get("sources", {})
    fig, ax = plt.subplots(figsize=(6, 4))
    for src, rows in semi["curve"].items():
        ns = sorted(int(n) for n in rows)
        mean = [rows[str(n)]["accuracy_mean"] for n in ns]
        std = [rows[str(n)]["accuracy_std"] for n in ns]
        line = ax.errorbar(ns, mean, yerr=std, marker="o", capsize=3, label=src.replace("_", " "))
        if src in full:
            ax.axhline(
                full[src]["accuracy_mean"],
                ls="--",
                color=line[0].get_color(),
                alpha=0.6,
                label=f"{src.replace('_', ' ')}, all labels",
            )
    if "method" in semi and "classify" in semi["method"]:
        ax.axhline(semi["value"], color="k", ls=":", label="family's own classifier")
    ax.set_xscale("log")
    ax.set_xlabel("labels per class")
    ax.set_ylabel(f"test accuracy ({semi['test_split']} split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ood_lines(e: dict) -> list[str]:
    """One row per corruption (or out-of-distribution set), one column per score."""
    scores = sorted({s for row in e["auroc"].values() for s in row})
    lines = ["", "## Out-of-distribution detection (AUROC)", "", "| against | " + " | ".join(scores) + " |",
             "| --- " * (1 + len(scores)) + "|"]
    for other, row in e["auroc"].items():
        lines.append(f"| {other} | " + " | ".join(_fmt(row.get(s), 3) for s in scores) + " |")
    return lines


def markdown(results: dict, figures: dict[str, Path]) -> str:
    m = results["metrics"]
    ck = results.get("checkpoint") or {}
    lines = [f"# Evaluation: {results.get('family') or 'model'} on {results.get('dataset')}", ""]
    if ck:
        lines.append(
            f"Checkpoint `{ck.get('path', '')}` (sha256 `{ck.get('sha256', '')}`)"
            + (f", step {results['step']}" if results.get("step") is not None else "")
            + "."
        )
    lines += [
        f"World size {results.get('world_size', 1)}, {results.get('seconds', 0)} s.",
        "",
        "| metric | value | what it is | counts |",
        "| --- | --- | --- | --- |",
    ]
    for name in ORDER:
        e = m.get(name)
        if e is None:
            continue
        if name.startswith("bpd"):
            val = f"{_fmt(e['value'])} ± {_fmt(e['sem'])} (s.e.)"
            what = e["quantity"]
            counts = f"{e['count']} examples, {e['split']} split"
        elif name in ("linear_probe", "semisup"):
            val = f"{_fmt(e['value'])} ± {_fmt(e.get('std'))}"
            what = e.get("method", "linear probe on encode() features, all labels")
            counts = f"train {e['train']} ({e['train_split']}), test {e['test']} ({e['test_split']})"
        else:
            val = _fmt(e["value"], 6 if "kid" in name else 3) + (
                f" ± {_fmt(e['std'], 6 if 'kid' in name else 3)}" if "std" in e else ""
            )
            what = e["label"]
            ref = e["reference"]
            counts = f"{e['num_samples']} samples vs {ref['count']} from the {ref['split']} split"
            if "num_real" in e:  # precision/recall/density/coverage: equal-sized subsets
                counts = f"{e['num_samples']} samples vs {e['num_real']} of the {ref['split']} split, k={e['k']}"
        lines.append(f"| {name} | {val} | {what} | {counts} |")
    others = [n for n, e in m.items() if n not in ORDER and n != "inference_gap" and "value" in e]
    for name in others:  # classifier metrics, reconstruction, ...: value, what it is, how many examples
        e = m[name]
        val = _fmt(e["value"]) + (f" ± {_fmt(e['sem'])} (s.e.)" if "sem" in e else "")
        counts = f"{e['count']} examples, {e['split']} split" if "count" in e and "split" in e else ""
        lines.append(f"| {name} | {val} | {e.get('quantity') or e.get('unit', '')} | {counts} |")
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"| {name} | skipped | {reason} | |")
    lines += ["", "## Definitions", ""]
    for name in (*ORDER, *others):
        if name in m and "definition" in m[name]:
            lines.append(f"- **{name}**: {m[name]['definition']}.")
    if "ood" in m:
        lines += _ood_lines(m["ood"])
    if "inference_gap" in m:
        lines += _gap_lines(m["inference_gap"])
    if "linear_probe" in m or "semisup" in m:
        lines += [
            "",
            "## Probes (test accuracy, mean ± std over seeds)",
            "",
            "Baselines: the same probe on raw pixels and on a randomly initialized encoder of that shape.",
            "",
            "| features | all labels | "
            + " | ".join(
                f"{n}/class"
                for n in sorted(
                    int(k) for k in next(iter(m.get("semisup", {}).get("curve", {"": {}}).values()))
                )
            )
            + " |",
        ]
        lines.append(
            "| --- " * (2 + len(next(iter(m.get("semisup", {}).get("curve", {"": {}}).values())))) + "|"
        )
        srcs = list(m.get("linear_probe", {}).get("sources", {}) or m.get("semisup", {}).get("curve", {}))
        for src in srcs:
            full = m.get("linear_probe", {}).get("sources", {}).get(src)
            row = [
                src.replace("_", " "),
                f"{_fmt(full['accuracy_mean'])} ± {_fmt(full['accuracy_std'])}" if full else "n/a",
            ]
            curve = m.get("semisup", {}).get("curve", {}).get(src, {})
            for n in sorted(curve, key=int):
                row.append(f"{_fmt(curve[n]['accuracy_mean'])} ± {_fmt(curve[n]['accuracy_std'])}")
            lines.append("| " + " | ".join(row) + " |")
    if figures:
        lines += ["", "## Figures", ""]
        captions = {
            "samples": "Samples",
            "reconstructions": "Reconstructions (originals above)",
            "bpd_curve": "Bits/dim over training",
            "probe_accuracy": "Probe accuracy against labels per class",
            "inference_gap": "Inference gaps (± s.e.)",
            "latent_interpolation": "Interpolations between encoded test images (ends: the images)",
            "latent_manifold": "The decoder over the 2-D latent space (Phi^-1 grid)",
            "latent_labels": "One latent decoded with every label (first column: the image)",
            "analogies": "Analogies: each test image (left), its style decoded with every label",
            "reliability": "Reliability diagram: accuracy against confidence per bin",
        }
        for key, path in figures.items():
            lines += [f"### {captions.get(key, key)}", "", f"![{key}]({path.name})", ""]
    lines += ["", "The evaluation config is in metrics.json (`eval_config`).", ""]
    return "\n".join(lines)


def _gap_lines(g: dict) -> list[str]:
    s = g["settings"]
    rows = [(f"log p(x) (IWAE-{s['iwae_k']}, proposal q*)", "log_px"), ("ELBO, optimized q*", "elbo_optimized"),
            ("ELBO, amortized q", "elbo_amortized"), ("approximation gap", "approximation_gap"),
            ("amortization gap", "amortization_gap")]
    lines = ["", f"## Inference gaps (nats per example, {g['count']} examples of the {g.get('split')} split)", "",
             "| quantity | mean ± s.e. |", "| --- | --- |"]
    lines += [f"| {label} | {_fmt(g[key]['mean'], 2)} ± {_fmt(g[key]['sem'], 2)} |" for label, key in rows]
    lines += ["", f"q* = {s['steps']} Adam steps (lr {s['lr']}, {s['opt_samples']} samples a step) on each "
              f"example's posterior parameters from the encoder's output; each ELBO from {s['samples']} samples."]
    return lines


def log_to_wandb(results: dict, figures: dict[str, Path]) -> None:
    """Log the flat metrics and the figures to the active W&B run, if there is one and it is wanted."""
    if not results.get("eval_config", {}).get("log_wandb", True):
        return
    try:
        import wandb  # heavy: only with an active W&B run
    except ImportError:
        return
    if wandb.run is None:
        return
    payload: dict[str, Any] = dict(results.get("summary", {}))
    for key, path in figures.items():
        payload[f"eval/{key}"] = wandb.Image(str(path))
    wandb.log(payload)


def nan_to_none(obj: Any) -> Any:
    """JSON has no NaN: replace non-finite floats by null, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, np.generic):
        return nan_to_none(obj.item())
    return obj
