"""`scalegen ema RUN --sigma-rel S --out CKPT`: the post-hoc EMA of width S from a run's snapshots, as an
ordinary checkpoint; `--sigma-rel A:B:N --metric M` evaluates N widths and keeps the best.

The output holds the run's config and DataSpec (from its newest checkpoint) with `state_dict` replaced by
the reconstruction and no separate EMA weights, so `scalegen eval/sample/release` and `load_model` take it
like any checkpoint; `posthoc_ema` inside records the width, step, profile error and coefficients.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from scalegen.callbacks.posthoc_ema import combine, list_snapshots, solve
from scalegen.checkpoints import atomic_save, load_model, read_checkpoint, resolve_checkpoint
from scalegen.config.loader import apply_overrides
from scalegen.ema_profiles import sigma_rel_to_gamma
from scalegen.errors import UserError
from scalegen.eval.data import EvalData
from scalegen.eval.runner import evaluate, parse_metrics

HELP = "post-hoc EMA (EDM2): reconstruct the average of any width from a run's snapshots, or sweep widths"

# Metrics where less is better; every other metric the runner reports (IS, accuracies, precision/recall,
# density, coverage, probes) is better higher.
LOWER_IS_BETTER = ("bpd", "bpd_ode", "fid", "kid", "domain_fid", "domain_kid", "ece", "inference_gap")
KEEP = ("scalegen", "global_step", "epoch", "stage1", "pytorch-lightning_version")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (its ema_snapshots/ and newest checkpoint), or a checkpoint in one "
                                    "(its config and DataSpec go into the output)")
    parser.add_argument("--sigma-rel", required=True, metavar="S|A:B:N",
                        help="width of the average (profile std / training length), or A:B:N for N widths "
                             "from A to B evenly (needs --metric)")
    parser.add_argument("--out", required=True, help="checkpoint file to write (the best one for a sweep)")
    parser.add_argument("--metric", default=None,
                        help="eval metric that picks the best width of a sweep (bpd, fid, kid, is, ...)")
    parser.add_argument("--snapshots", default=None, metavar="DIR",
                        help="snapshot folder (default: the run's ema.posthoc.dir, else RUN/ema_snapshots)")
    parser.add_argument("--max-profile-error", type=float, default=0.1,
                        help="refuse widths the snapshots fit worse than this relative L2 error (default 0.1)")
    parser.add_argument("--eval-out", default=None,
                        help="folder for the sweep's reports (default: next to --out, OUT_STEM-sweep/)")
    parser.add_argument("--device", default=None, help="device for the sweep's evaluation (default: cuda if any)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for the sweep's evaluation, e.g. eval.iwae_k=100")


def parse_sigma_rels(text: str) -> list[float]:
    """`0.07` -> [0.07]; `0.02:0.2:10` -> 10 values from 0.02 to 0.2 inclusive."""
    parts = text.split(":")
    try:
        if len(parts) == 1:
            return [float(parts[0])]
        if len(parts) == 3:
            lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
            if n >= 2 and lo < hi:
                return [float(v) for v in np.linspace(lo, hi, n)]
    except ValueError:
        pass
    raise UserError(f"--sigma-rel {text!r} is malformed: give one width (0.07) or a range START:STOP:COUNT with "
                    "START < STOP and COUNT >= 2 (0.02:0.2:10)")


def output_checkpoint(base: dict, weights: dict[str, torch.Tensor], info: dict) -> dict:
    out = {k: base[k] for k in KEEP if k in base}
    out["state_dict"] = weights
    out["posthoc_ema"] = info
    return out


def run(args: argparse.Namespace) -> int:
    sigmas = parse_sigma_rels(args.sigma_rel)
    if len(sigmas) > 1 and not args.metric:
        raise UserError("a --sigma-rel range needs --metric to pick the best (e.g. --metric bpd)")
    if not args.max_profile_error > 0:
        raise UserError(f"--max-profile-error must be > 0, got {args.max_profile_error}")
    metric = parse_metrics(args.metric, None)[0] if args.metric else ""
    ckpt_path = resolve_checkpoint(args.run)
    run_dir = Path(args.run) if ckpt_path != Path(args.run) else ckpt_path.parent.parent  # {run}/checkpoints/x
    base = read_checkpoint(ckpt_path)
    configured = base["scalegen"]["config"].get("ema", {}).get("posthoc", {}).get("dir")
    folder = Path(args.snapshots or configured or run_dir / "ema_snapshots")
    entries = list_snapshots(folder)
    solved = [(s, *solve(entries, s, args.max_profile_error)) for s in sigmas]  # all refusals before any work

    def reconstruction(sigma: float, x: np.ndarray, err: float, step: int) -> tuple[dict, dict]:
        info = {"sigma_rel": sigma, "gamma": sigma_rel_to_gamma(sigma), "step": step, "profile_error": err,
                "snapshot_folder": str(folder), "base_checkpoint": str(ckpt_path),
                "snapshots": [[e["step"], e["sigma_rel"], float(c)] for e, c in zip(entries, x)]}
        return combine(entries, x), info

    out = Path(args.out)
    if len(solved) == 1:
        weights, info = reconstruction(*solved[0])
        atomic_save(output_checkpoint(base, weights, info), out)
        print(f"sigma_rel {info['sigma_rel']:g} at step {info['step']} from {len(entries)} snapshot profiles "
              f"(profile error {info['profile_error']:.2%}): wrote {out}")
        return 0

    model, cfg = load_model(ckpt_path)
    cfg = apply_overrides(cfg, args.overrides)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    data = EvalData.from_config(cfg.data)
    eval_root = Path(args.eval_out) if args.eval_out else out.with_name(f"{out.stem}-sweep")
    lower = metric in LOWER_IS_BETTER
    rows, best = [], None
    for sigma, x, err, step in solved:
        weights, info = reconstruction(sigma, x, err, step)
        model.load_state_dict(weights)
        results = evaluate(model, cfg.eval, data, eval_root / f"sigma_rel-{sigma:.4f}", metrics=[metric],
                           checkpoint={"path": str(ckpt_path), "posthoc_ema": info}, log_wandb=False)
        key = f"eval/{metric}"
        if key not in results["summary"]:
            skipped = results.get("skipped", {}).get(metric, "")
            raise UserError(f"the evaluation reported no {metric} for this model ({skipped or 'not computed'}); "
                            f"choose a metric it reports: {', '.join(results['summary']) or 'none'}")
        value = results["summary"][key]
        rows.append({"sigma_rel": sigma, metric: value, "profile_error": err})
        if best is None or (value < best[0] if lower else value > best[0]):
            best = (value, weights, info)
        print(f"sigma_rel {sigma:.4f}  {metric} {value:.6g}  (profile error {err:.2%})", flush=True)
    assert best is not None
    value, weights, info = best
    info["sweep"] = {"metric": metric, "lower_is_better": lower, "rows": rows}
    atomic_save(output_checkpoint(base, weights, info), out)
    eval_root.mkdir(parents=True, exist_ok=True)
    (eval_root / "sweep.json").write_text(json.dumps(info["sweep"], indent=2) + "\n")
    print(f"best: sigma_rel {info['sigma_rel']:.4f} ({metric} {value:.6g}, {'lower' if lower else 'higher'} is "
          f"better): wrote {out}; table in {eval_root / 'sweep.json'}")
    return 0
