"""The evaluation runner: every metric through the family contract only.

`evaluate(model, cfg.eval, data, out_dir)` uses the predictions the family declares in
`model.predictions` (`nll`, `sample`, `encode`, `reconstruct`, `classify`, `velocity`), `model.nll_kind` and
`model.data_spec`; it never looks at the family's name, a method's signature or whether a method
exists. Likelihoods, features and classifiers run under `torch.no_grad` (the ODE likelihood switches
gradients on inside for its divergence); sampling does not (a Langevin sampler needs gradients; a family
turns them off in its own `sample`). Per-example work is split across ranks
and gathered exactly (`scalegen.eval.dist`); rank 0 writes metrics.json, report.md and the figures
and every rank returns the same flat summary.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from scalegen.errors import UserError, did_you_mean
from scalegen.eval.classifier import (
    CLASSIFIER_METRICS,
    ais_details,
    classifier_metrics,
    other_dataset,
)
from scalegen.eval.data import EvalData
from scalegen.eval.dist import broadcast_object, gather_rows, rank_world, shard_bounds
from scalegen.eval.extractors import domain_extractor, inception_extractor, reference_statistics, wants_domain
from scalegen.eval.gaps import DEFINITION as GAP_DEFINITION
from scalegen.eval.gaps import measure_inference_gap
from scalegen.eval.latents import has_latents, latent_grids
from scalegen.eval.report import write_report
from scalegen.families.base import IMPORTANCE_SAMPLED
from scalegen.metrics.bpd import summarize_bpd
from scalegen.metrics.fid import feature_statistics, frechet_distance
from scalegen.metrics.inception import WEIGHTS_ENV, weights_hint
from scalegen.metrics.inception_score import inception_score
from scalegen.metrics.kid import kernel_inception_distance
from scalegen.metrics.prdc import prdc
from scalegen.metrics.weights import cache_dir
from scalegen.objectives.ode_likelihood import example_noise, ode_nll
from scalegen.probes import ProbeSettings, linear_probe

ALL_METRICS = ("bpd", "bpd_ode", "fid", "kid", "is", "linear_probe", "semisup", "reconstruction",
               "inference_gap", *CLASSIFIER_METRICS)

DEFINITIONS = {
    "bpd": "negative log-likelihood of the discrete test data in bits per dimension: nll_nats / (D ln 2), "
    "averaged over examples (D = values per example)",
    "bpd_ode": "negative log-likelihood of the discrete test data under the model's ODE in bits per dimension: "
    "(-log p(y) - D log(2/(L-1))) / (D ln 2), y = the value's point on the L-level grid in [-1, 1] plus uniform "
    "noise within its bin, log p(y) by the instantaneous change of variables integrated from the data (t=1) "
    "to the N(0, I) prior (t=0); an upper bound on the NLL in expectation over the noise",
    "fid": "Frechet distance between Gaussians fitted to 2048-d Inception pool3 features of generated "
    "samples and of the reference split (pytorch-fid protocol)",
    "kid": "unbiased MMD^2 with kernel (x.y/D + 1)^3 between Inception features of generated samples and of "
    "the reference split, mean (std) over random subsets",
    "is": "exp(E KL(p(y|x) || p(y))) over the 1008-way Inception softmax of generated samples, mean (std) "
    "over splits",
    "domain_fid": "Frechet distance between Gaussians fitted to the 64-d penultimate features of a "
    "classifier trained on this dataset by scalegen; not comparable with Inception FID",
    "domain_kid": "KID (cubic-kernel unbiased MMD^2) on the domain classifier's features",
    "domain_is": "Inception-Score formula on the domain classifier's softmax (1 = one class, C = all classes "
    "confidently and evenly)",
    "precision": "improved precision (Kynkaanniemi et al. 2019): fraction of generated samples inside the "
    "union of the real features' k-NN balls",
    "recall": "improved recall (Kynkaanniemi et al. 2019): fraction of real examples inside the union of the "
    "generated features' k-NN balls",
    "density": "density (Naeem et al. 2020): real k-NN balls containing a generated sample, summed over "
    "samples, / (k x samples); 1 in expectation for identical distributions",
    "coverage": "coverage (Naeem et al. 2020): fraction of real k-NN balls containing at least one generated "
    "sample",
    "linear_probe": "test accuracy of a multinomial logistic regression on standardized frozen features, "
    "weight decay chosen on a validation part of the training split, mean (std) over seeds",
    "semisup": "test accuracy with N labelled training examples per class: the family's own classifier "
    "when it has one, else the linear-probe protocol on those labels only; mean (std) over seeds",
    "reconstruction": "mean squared error between test images and the family's reconstructions, pixel values "
    "scaled to [0, 1], averaged over values then examples",
    "inference_gap": GAP_DEFINITION,
}

BOUND_NAMES = {
    "exact": "exact negative log-likelihood",
    "elbo": "negative ELBO (an upper bound on the NLL)",
    "iwae": "negative IWAE bound (an upper bound on the NLL)",
    "vlb": "variational bound (an upper bound on the NLL)",
    "bound": "upper bound on the NLL (deterministic posterior: reconstruction term plus the prior's NLL of "
    "the code; see the family)",
}


def parse_metrics(names: list[str] | str | None, model: Any) -> list[str]:
    """Validated metric names; empty = every metric the model's declared predictions allow."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        caps = model.predictions
        names = [
            m
            for m, need in (
                ("bpd", "nll"),
                ("bpd_ode", "velocity"),
                ("fid", "sample"),
                ("kid", "sample"),
                ("is", "sample"),
                ("linear_probe", "encode"),
                ("semisup", "encode"),
                ("reconstruction", "reconstruct"),
            )
            if need in caps
        ]
    unknown = [n for n in names if n not in ALL_METRICS]
    if unknown:
        raise UserError(f"unknown metric {unknown[0]!r}.{did_you_mean(unknown[0], ALL_METRICS)}")
    return list(dict.fromkeys(names))


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def per_example(fn, x: Tensor, y: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """fn(x_batch, y_batch) -> [b, ...] over all examples (no gradients), split across ranks, gathered
    in order."""
    rank, world = rank_world()
    start, stop = shard_bounds(len(x), rank, world)
    with torch.no_grad():
        out = [
            fn(x[i : min(i + batch_size, stop)].to(device), y[i : min(i + batch_size, stop)].to(device))
            .detach()
            .cpu()
            for i in range(start, stop, batch_size)
        ]
        if not out:  # more ranks than examples: an empty block of the right trailing shape
            probe = fn(x[:1].to(device), y[:1].to(device)).detach().cpu()
            out = [probe[:0]]
    return gather_rows(torch.cat(out))


def generate(model: Any, n: int, batch_size: int) -> Tensor:
    """This rank's share of n samples (rank r draws its contiguous block of the n). Every rank calls
    `sample` (a rank without a share draws one and drops it), so sharded parameters can be gathered."""
    rank, world = rank_world()
    start, stop = shard_bounds(n, rank, world)
    parts = [model.sample(min(batch_size, stop - i)).detach().cpu() for i in range(start, stop, batch_size)]
    return torch.cat(parts) if parts else model.sample(1).detach().cpu()[:0]


def random_encoder(model: Any, seed: int) -> Any:
    """A freshly initialized model of the same family, shape and config (the probe's baseline)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)(model.cfg, model.optim_cfg, model.data_spec)
    return fresh.to(_device(model)).eval()


class Evaluation:
    """One evaluation of one model; `run()` returns the full results dict (see metrics.json)."""

    def __init__(self, model: Any, cfg: Any, data: EvalData, metrics: list[str] | str | None = None) -> None:
        self.model, self.cfg, self.data = model, cfg, data
        self.metrics = parse_metrics(metrics if metrics is not None else list(cfg.metrics), model)
        self.caps = model.predictions
        self.device = _device(model)
        self.spec = model.data_spec
        self.results: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}
        self.artifacts: dict[str, Any] = {}  # tensors for figures
        # Another dataset's images as OOD negatives, read before any metric runs (a bad folder fails first).
        self.ood_data = (other_dataset(cfg, self.spec.shape) if getattr(cfg, "ood_data", None)
                         and "classify" in self.caps else None)
        # FID/KID/IS without a feature network to compare samples in: refused before any metric runs.
        if ({"fid", "kid", "is"} & set(self.metrics) and "sample" in self.caps and self.spec.kind == "image"
                and not self._has_inception_weights() and not self._uses_domain_network()):
            others = ",".join(m for m in self.metrics if m not in ("fid", "kid", "is"))
            skip = f"; or leave them out: --metrics {others}" if others else ""
            raise UserError(f"FID/KID/IS need the Inception weights for this data: {weights_hint()}{skip}")

    # ---- helpers -----------------------------------------------------------------------------
    def _eval_split(self) -> tuple[Tensor, Tensor]:
        return self.data.split(self.cfg.split, self.cfg.max_examples)

    def _skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason

    def run(self) -> dict:
        t0 = time.time()
        model = self.model
        was_training = model.training
        model.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed + 7919 * rank_world()[0])
            if "bpd" in self.metrics:
                self.bpd()
            if "bpd_ode" in self.metrics:
                self.bpd_ode()
            if {"fid", "kid", "is"} & set(self.metrics):
                self.sample_metrics()
            if {"linear_probe", "semisup"} & set(self.metrics):
                self.probes()
            if "reconstruction" in self.metrics:
                self.reconstruction()
            if "inference_gap" in self.metrics:  # scalegen.eval.gaps (opt-in: per-example optimization)
                entry, reason = measure_inference_gap(self.model, self.cfg, *self._eval_split(), self.device)
                self.results.update({"inference_gap": entry} if entry else {})
                self.skipped.update({"inference_gap": reason} if reason else {})
            # Accuracy, ECE, OOD AUROC for families that classify; AIS details for nll_kind "ais".
            classifier_metrics(self, per_example, all_by_default=self.metrics == parse_metrics([], model))
            ais_details(self)
            self.figures_data()
        model.train(was_training)
        return {
            "metrics": self.results,
            "skipped": self.skipped,
            "seconds": round(time.time() - t0, 2),
            "world_size": rank_world()[1],
        }

    # ---- bits/dim ----------------------------------------------------------------------------
    def bpd(self) -> None:
        if "nll" not in self.caps:
            return self._skip(
                "bpd", f"{self.model.family_name or type(self.model).__name__} has no likelihood"
            )
        x, y = self._eval_split()
        dims = self.spec.dims
        kind = self.model.nll_kind
        runs: list[tuple[str, dict]] = []
        if kind in IMPORTANCE_SAMPLED and self.cfg.iwae_k > 1:
            k = self.cfg.iwae_k
            runs.append(("bpd", {"k": k}))
            runs.append(("bpd_elbo", {"k": 1}))
        else:
            runs.append(("bpd", {"k": None}))
        for name, kw in runs:
            nll = per_example(
                lambda a, b, kw=kw: self.model.nll(a, b, **kw), x, y, self.cfg.batch_size, self.device
            )
            s = summarize_bpd(nll, dims)
            if (kw["k"] or 1) > 1:
                quantity = f"negative IWAE-{kw['k']} bound (an upper bound on the NLL; k={kw['k']})"
            elif kw["k"] == 1:
                quantity = BOUND_NAMES["elbo"]
            else:
                quantity = BOUND_NAMES.get(kind, kind)
            self.results[name] = {
                "value": s["mean"],
                "sem": s["sem"],
                "unit": "bits/dim",
                "quantity": quantity,
                "definition": DEFINITIONS["bpd"],
                "count": s["count"],
                "split": self.cfg.split,
                "dims": dims,
                "levels": self.spec.levels,
            }
            self.artifacts.setdefault("nll_" + name, nll)

    def bpd_ode(self) -> None:
        """Bits/dim of the ODE likelihood (scalegen.objectives.ode_likelihood) on the first
        `ode_max_examples` of the bpd examples."""
        if "velocity" not in self.caps:
            return self._skip("bpd_ode", f"{self.model.family_name or type(self.model).__name__} has no velocity field")
        if self.spec.kind != "image":
            return self._skip("bpd_ode", f"defined for images only (data kind: {self.spec.kind})")
        c, dims, levels = self.cfg, self.spec.dims, self.spec.levels
        x, y = self._eval_split()
        x, y = x[: c.ode_max_examples], y[: c.ode_max_examples]
        divergence = c.ode_divergence
        if divergence == "auto":
            divergence = "exact" if dims <= c.ode_exact_max_dims else "hutchinson"
        dtype = next((p.dtype for p in self.model.parameters() if p.dtype == torch.float64), torch.float32)
        k = c.ode_probes if divergence == "hutchinson" else 0

        def nll(i: Tensor, b: Tensor) -> Tensor:  # i: the examples' indices, so that their noise is their own
            i = i.cpu()
            u, probes = example_noise(i, self.spec.shape, c.seed, k, c.ode_probe)
            return ode_nll(lambda xt, t: self.model.velocity(xt, t, b), x[i].to(self.device), levels,
                           u.to(self.device), probes=None if probes is None else probes.to(self.device),
                           method=c.ode_method, steps=c.ode_steps, rtol=c.ode_rtol, atol=c.ode_atol, dtype=dtype)

        values = per_example(nll, torch.arange(len(x)), y, c.batch_size, self.device)
        s = summarize_bpd(values, dims)
        if divergence == "exact":
            label = "ODE (exact divergence)"
        else:
            label = f"ODE (Hutchinson, {k} {c.ode_probe.capitalize()} probe{'s' if k > 1 else ''})"
        solver = (f"dopri5, rtol {c.ode_rtol:g}, atol {c.ode_atol:g}" if c.ode_method == "adaptive"
                  else f"{c.ode_method}, {c.ode_steps} steps")
        self.results["bpd_ode"] = {
            "value": s["mean"],
            "sem": s["sem"],
            "unit": "bits/dim",
            "quantity": f"{label}, uniform dequantization, {solver}: an upper bound on the NLL in expectation",
            "definition": DEFINITIONS["bpd_ode"],
            "count": s["count"],
            "split": c.split,
            "dims": dims,
            "levels": levels,
            "solver": "dopri5 (torchdiffeq)" if c.ode_method == "adaptive" else c.ode_method,
            "method": c.ode_method,
            "steps": None if c.ode_method == "adaptive" else c.ode_steps,
            "rtol": c.ode_rtol if c.ode_method == "adaptive" else None,
            "atol": c.ode_atol if c.ode_method == "adaptive" else None,
            "divergence": divergence,
            "probes": c.ode_probes if divergence == "hutchinson" else None,
            "probe": c.ode_probe if divergence == "hutchinson" else None,
            "dequantization": "uniform",
            "max_examples": c.ode_max_examples,
        }
        self.artifacts["nll_bpd_ode"] = values

    # ---- reconstruction error ----------------------------------------------------------------------
    def reconstruction(self) -> None:
        if "reconstruct" not in self.caps:
            return self._skip("reconstruction", "the family does not reconstruct")
        x, y = self._eval_split()
        scale = float(self.spec.levels - 1)

        def mse(a: Tensor, b: Tensor) -> Tensor:
            diff = (self.model.reconstruct(a, b).double() - a.double()) / scale
            return diff.pow(2).flatten(1).mean(1)

        err = per_example(mse, x, y, self.cfg.batch_size, self.device)
        n = err.numel()
        self.results["reconstruction"] = {
            "value": float(err.mean()), "sem": float(err.std() / math.sqrt(n)) if n > 1 else float("nan"),
            "unit": "MSE", "definition": DEFINITIONS["reconstruction"], "count": n, "split": self.cfg.split,
        }

    # ---- FID / KID / IS ------------------------------------------------------------------------
    def _has_inception_weights(self) -> bool:
        return bool(self.cfg.inception_weights or os.environ.get(WEIGHTS_ENV))

    def _uses_domain_network(self) -> bool:
        return bool(self.cfg.domain_fid and wants_domain(self.spec))

    def extractors(self) -> list:
        """The feature networks (one at least: `__init__` refused an evaluation that would have none)."""
        out = []
        if self._has_inception_weights():
            out.append(inception_extractor(self.cfg.inception_weights, self.device, self.cfg.inception_precision))
        else:
            self.skipped["fid"] = f"no Inception weights: {weights_hint()}"
        if self._uses_domain_network():
            out.append(domain_extractor(self.data, self.device, self.cfg.reference_split))
        return out

    def sample_metrics(self) -> None:
        if "sample" not in self.caps:
            for m in ("fid", "kid", "is"):
                self._skip(m, "the family cannot sample")
            return
        if self.spec.kind != "image":
            for m in ("fid", "kid", "is"):
                self._skip(m, f"defined for images only (data kind: {self.spec.kind})")
            return
        n = self.cfg.num_samples
        if n < max(2, rank_world()[1]):
            raise UserError(
                f"eval.num_samples={n} is too small: FID needs at least 2 samples and one per rank"
            )
        local = generate(self.model, n, self.cfg.batch_size)
        if rank_world()[0] == 0:
            self.artifacts["samples"] = local[:64]
        for ex in self.extractors():
            ref = reference_statistics(
                ex,
                self.data,
                self.cfg.reference_split,
                self.cfg.reference_examples,
                self.cfg.batch_size,
                self.cfg.kid_subset_size,
                cache_dir() / "fid_stats",
                self.cfg.prdc_examples,
            )
            # Features of this rank's samples, then every rank's gathered in order (one forward pass
            # gives the features for FID and KID and the logits for IS).
            with torch.no_grad():
                outs = [ex(local[i : i + self.cfg.batch_size]) for i in range(0, len(local), self.cfg.batch_size)]
            feats = gather_rows(torch.cat([o[0] for o in outs]))
            logits = gather_rows(torch.cat([o[1] for o in outs]))
            common = {
                "extractor": ex.label,
                "num_samples": len(feats),
                "reference": {
                    "split": self.cfg.reference_split,
                    "count": int(ref["count"]),
                    "statistics": Path(ref["path"]).name,
                    "data_checksum": str(ref["data_checksum"]),
                    "preprocessing_checksum": str(ref["preprocessing_checksum"]),
                },
            }
            if "fid" in self.metrics:
                mu, sigma = feature_statistics(feats)
                value = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
                self.results[f"{ex.key}fid"] = {
                    "value": value,
                    "definition": DEFINITIONS[f"{ex.key}fid"],
                    "label": ex.label,
                    **common,
                }
            if "kid" in self.metrics:
                kid = kernel_inception_distance(
                    feats,
                    ref["kid_features"],
                    self.cfg.kid_subsets,
                    self.cfg.kid_subset_size,
                    seed=self.cfg.seed,
                )
                self.results[f"{ex.key}kid"] = {
                    "value": kid["mean"],
                    "std": kid["std"],
                    "subset_size": kid["subset_size"],
                    "num_subsets": kid["num_subsets"],
                    "reference_features": int(len(ref["kid_features"])),
                    "definition": DEFINITIONS[f"{ex.key}kid"],
                    "label": ex.label.replace("FID", "KID"),
                    **common,
                }
            if "is" in self.metrics:
                score = inception_score(logits, self.cfg.is_splits)
                self.results[f"{ex.key}is"] = {
                    "value": score["mean"],
                    "std": score["std"],
                    "splits": score["splits"],
                    "definition": DEFINITIONS[f"{ex.key}is"],
                    "label": ex.label.replace("FID", "IS"),
                    **common,
                }
            if self.cfg.prdc_examples:
                self.prdc(ex, feats, ref, common)

    def prdc(self, ex: Any, feats: Tensor, ref: dict, common: dict) -> None:
        """Precision, recall, density, coverage on equally many generated and reference features."""

        n = min(self.cfg.prdc_examples, len(feats), len(ref["prdc_features"]))
        k_pr, k_dc = self.cfg.prdc_k, self.cfg.density_coverage_k
        names = ("precision", "recall", "density", "coverage")
        if n <= max(k_pr, k_dc):
            for name in names:
                self._skip(f"{ex.key}{name}", f"{n} features per set: needs more than k={max(k_pr, k_dc)}")
            return
        r = prdc(ref["prdc_features"][:n], feats[:n], k_pr, k_dc, device=self.device)
        for name in names:
            self.results[f"{ex.key}{name}"] = {
                "value": r[name],
                "k": k_pr if name in ("precision", "recall") else k_dc,
                **common,
                "num_samples": n,
                "num_real": n,
                "definition": DEFINITIONS[name],
                "label": ex.label.replace("FID", name),
            }

    # ---- probes ------------------------------------------------------------------------------
    def probes(self) -> None:
        if not {"encode", "classify"} & self.caps:
            for m in ("linear_probe", "semisup"):
                if m in self.metrics:
                    self._skip(m, "the family has no encoder")
            return
        if self.spec.num_classes < 2:
            for m in ("linear_probe", "semisup"):
                self._skip(m, "the data has no class labels")
            return
        c = self.cfg
        train_x, train_y = self.data.split(c.probe_split, c.probe_train_examples)
        test_x, test_y = self._eval_split()
        keep = train_y >= 0
        train_x, train_y = train_x[keep], train_y[keep]
        settings = ProbeSettings(steps=c.probe_steps, seeds=tuple(range(c.probe_seeds)))
        k = self.spec.num_classes
        sources: dict[str, tuple[Tensor, Tensor]] = {}
        encode_kw = {}
        if "encode" in self.caps:
            enc = lambda m: lambda a, b: m.encode(a).float().flatten(1)  # noqa: E731 (label-free features)
            sources["model"] = (
                per_example(enc(self.model), train_x, train_y, c.batch_size, self.device),
                per_example(enc(self.model), test_x, test_y, c.batch_size, self.device),
            )
            rnd = random_encoder(self.model, c.seed + 1)
            sources["random_encoder"] = (
                per_example(enc(rnd), train_x, train_y, c.batch_size, self.device),
                per_example(enc(rnd), test_x, test_y, c.batch_size, self.device),
            )
            del rnd
        sources["pixels"] = (train_x.float().flatten(1), test_x.float().flatten(1))
        counts = {
            "train": len(train_y),
            "test": len(test_y),
            "train_split": c.probe_split,
            "test_split": c.split,
        }
        if "linear_probe" in self.metrics:
            rows = {}
            for name, (ftr, fte) in sources.items():
                rows[name] = linear_probe(
                    ftr.to(self.device),
                    train_y.to(self.device),
                    fte.to(self.device),
                    test_y.to(self.device),
                    k,
                    settings,
                ).to_dict()
            if "model" in rows:
                self.results["linear_probe"] = {
                    "value": rows["model"]["accuracy_mean"],
                    "std": rows["model"]["accuracy_std"],
                    "definition": DEFINITIONS["linear_probe"],
                    "sources": rows,
                    "feature_dims": {n: int(s[0].shape[1]) for n, s in sources.items()},
                    **counts,
                    **encode_kw,
                }
            else:
                self._skip("linear_probe", "the family has no encoder (only the pixel baseline was computed)")
        if "semisup" in self.metrics:
            curve = sorted(set(c.label_curve) | {c.labels_per_class})
            table: dict[str, dict[int, dict]] = {name: {} for name in sources}
            for n in curve:
                for name, (ftr, fte) in sources.items():
                    table[name][n] = linear_probe(
                        ftr.to(self.device),
                        train_y.to(self.device),
                        fte.to(self.device),
                        test_y.to(self.device),
                        k,
                        settings,
                        labels_per_class=n,
                    ).to_dict()
            entry = {
                "labels_per_class": c.labels_per_class,
                "definition": DEFINITIONS["semisup"],
                "curve": {name: {str(n): r for n, r in rows.items()} for name, rows in table.items()},
                **counts,
            }
            if "classify" in self.caps:
                correct = per_example(
                    lambda a, b: (self.model.classify(a).argmax(-1) == b).float(),
                    test_x,
                    test_y,
                    c.batch_size,
                    self.device,
                )
                entry.update(
                    value=float(correct.mean()), std=0.0, method="the family's own classifier (classify)"
                )
            elif "model" in table:
                r = table["model"][c.labels_per_class]
                entry.update(
                    value=r["accuracy_mean"],
                    std=r["accuracy_std"],
                    method=f"linear probe on encode() features with {c.labels_per_class} labels per class",
                )
            else:
                return self._skip("semisup", "the family has neither an encoder nor a classifier")
            self.results["semisup"] = entry

    # ---- figure inputs ---------------------------------------------------------------------------
    def figures_data(self) -> None:
        # Every rank runs the same forward passes (under ZeRO-3 or FSDP each must join them); rank 0 keeps
        # the results for the figures.
        keep = rank_world()[0] == 0
        if "samples" not in self.artifacts and "sample" in self.caps:
            samples = self.model.sample(min(64, self.cfg.num_samples)).detach().cpu()
            if keep:
                self.artifacts["samples"] = samples
        if "reconstruct" in self.caps:
            x, y = self._eval_split()
            x, y = x[:16], y[:16]
            with torch.no_grad():
                recon = self.model.reconstruct(x.to(self.device), y.to(self.device)).cpu()
            if keep:
                self.artifacts["reconstructions"] = (x, recon)
        if self.spec.kind == "image":
            # Figures beyond the common ones: latent exploration for families with a latent prior and a
            # decoder (scalegen.eval.latents), and the family's own (`extra_figures`, e.g. M2's analogies).
            x, y = self._eval_split()
            x, y = x[:16].to(self.device), y[:16].to(self.device)
            extra = latent_grids(self.model, x, y) if has_latents(self.model) else {}
            with torch.no_grad():
                extra.update(self.model.extra_figures(x, y))
            if keep and extra:
                self.artifacts["extra_figures"] = {k: (v.cpu(), nrow) for k, (v, nrow) in extra.items()}


def flat_summary(results: dict) -> dict[str, float]:
    """{"eval/<metric>": value} (plus probe baselines) for loggers."""
    out: dict[str, float] = {}
    for name, entry in results["metrics"].items():
        if isinstance(entry.get("value"), (int, float)) and math.isfinite(entry["value"]):
            out[f"eval/{name}"] = float(entry["value"])
        for src, row in entry.get("sources", {}).items():
            out[f"eval/{name}/{src}"] = float(row["accuracy_mean"])
        for src, rows in entry.get("curve", {}).items():
            r = rows.get(str(entry.get("labels_per_class")))
            if r is not None:
                out[f"eval/{name}/{src}"] = float(r["accuracy_mean"])
    return out


def evaluate(
    model: Any,
    cfg: Any,
    data: EvalData,
    out_dir: str | Path | None = None,
    *,
    metrics: list[str] | str | None = None,
    checkpoint: dict | None = None,
    run_dir: str | Path | None = None,
    step: int | None = None,
    config: dict | None = None,
    log_wandb: bool = True,
) -> dict:
    """Evaluate `model` under `cfg` (an EvalConfig) on `data`; write the report to out_dir (rank 0).

    Returns the results (every rank gets rank 0's), with `summary` = flat {"eval/...": value}.
    """
    ev = Evaluation(model, cfg, data, metrics)
    results = ev.run()
    results.update(
        family=getattr(model, "family_name", ""),
        dataset=data.name,
        step=step,
        checkpoint=checkpoint or {},
        eval_config=_plain(cfg),
        config=config or {},
    )
    results["summary"] = flat_summary(results)
    if rank_world()[0] == 0 and out_dir is not None:
        write_report(
            results,
            ev.artifacts,
            Path(out_dir),
            run_dir=Path(run_dir) if run_dir else None,
            spec=model.data_spec,
            log_wandb=log_wandb,
        )
    return broadcast_object(results)


def _plain(cfg: Any) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)
