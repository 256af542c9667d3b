"""Inference gaps (Cremer, Li & Duvenaud 2018): how far the amortized ELBO is below log p(x), split into

    approximation gap = log p(x) - ELBO(q*)           (the posterior family is too poor)
    amortization gap  = ELBO(q*) - ELBO(q_amortized)  (the encoder misses the best member of the family)

where q* is the posterior optimized for each example separately: Adam steps on that example's posterior
parameters (what the encoder emits, `model.posterior_params`), starting from the encoder's output, the
model held fixed. log p(x) is estimated by a large-k IWAE bound with q* as the proposal.

A family takes part by setting `reparameterized_posterior = True` and having
`posterior_params(x, y) -> [B, P]` and `log_weights(x, y, k, params=...) -> [k, B]`
(log p(x, z) - log q(z|x) for k reparameterized samples z ~ q_params, differentiable in params).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from scalegen.eval.dist import gather_rows, rank_world, shard_bounds

DEFINITION = ("inference gaps in nats per example (Cremer et al. 2018): approximation = log p(x) - ELBO(q*), "
              "amortization = ELBO(q*) - ELBO(q_encoder); q* = the posterior optimized per example from the "
              "encoder's output; log p(x) = IWAE-k with proposal q*; mean ± s.e. over examples")


@dataclass
class GapSettings:
    iwae_k: int = 1000  # importance samples for log p(x)
    samples: int = 100  # Monte-Carlo samples for each ELBO
    steps: int = 100  # Adam steps on each example's posterior parameters
    lr: float = 1e-2  # their learning rate
    opt_samples: int = 8  # samples per step's ELBO gradient
    chunk: int = 100  # samples per forward pass


def supports_gaps(model: Any) -> bool:
    return bool(getattr(model, "reparameterized_posterior", False)) and callable(
        getattr(model, "posterior_params", None)) and callable(getattr(model, "log_weights", None))


def _log_weights(model: Any, x: Tensor, y: Tensor | None, params: Tensor, k: int, chunk: int) -> Tensor:
    return torch.cat([model.log_weights(x, y, min(chunk, k - i), params=params) for i in range(0, k, chunk)])


def elbo(model: Any, x: Tensor, y: Tensor | None, params: Tensor, samples: int, chunk: int = 100) -> Tensor:
    """Monte-Carlo ELBO [B] of posterior `params`."""
    return _log_weights(model, x, y, params, samples, chunk).mean(0)


def iwae(model: Any, x: Tensor, y: Tensor | None, params: Tensor, k: int, chunk: int = 100) -> Tensor:
    """The IWAE-k lower bound on log p(x) [B] with proposal `params`."""
    return torch.logsumexp(_log_weights(model, x, y, params, k, chunk), 0) - math.log(k)


def optimize_posterior(model: Any, x: Tensor, y: Tensor | None, params: Tensor, s: GapSettings) -> Tensor:
    """Per-example maximization of the ELBO over the posterior parameters; the model is not updated.

    The examples' ELBOs are summed, so each example's parameters get only their own gradient, and Adam
    scales every coordinate separately: one batched run equals separate runs per example."""
    p = params.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=s.lr)
    with torch.enable_grad():
        for _ in range(s.steps):
            loss = -model.log_weights(x, y, s.opt_samples, params=p).mean(0).sum()
            (grad,) = torch.autograd.grad(loss, [p])
            p.grad = grad
            opt.step()
    return p.detach()


def example_gaps(model: Any, x: Tensor, y: Tensor | None, s: GapSettings) -> Tensor:
    """[B, 3]: log p(x) estimate, ELBO of the amortized posterior, ELBO of the optimized posterior."""
    with torch.no_grad():
        amortized = model.posterior_params(x, y)
    optimized = optimize_posterior(model, x, y, amortized, s)
    with torch.no_grad():
        e_amortized = elbo(model, x, y, amortized, s.samples, s.chunk)
        e_optimized = elbo(model, x, y, optimized, s.samples, s.chunk)
        log_px = iwae(model, x, y, optimized, s.iwae_k, s.chunk)
    return torch.stack([log_px, e_amortized, e_optimized], 1)


def _mean_sem(v: Tensor) -> dict[str, float]:
    v = v.double()
    sem = v.std().item() / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"mean": v.mean().item(), "sem": sem}


def summarize(rows: Tensor, settings: GapSettings) -> dict:
    """The metrics.json entry from the per-example rows of `example_gaps`."""
    log_px, e_amortized, e_optimized = rows.unbind(1)
    approximation, amortization = log_px - e_optimized, e_optimized - e_amortized
    return {
        "value": _mean_sem(log_px - e_amortized)["mean"],
        "unit": "nats",
        "approximation_gap": _mean_sem(approximation),
        "amortization_gap": _mean_sem(amortization),
        "log_px": _mean_sem(log_px),
        "elbo_amortized": _mean_sem(e_amortized),
        "elbo_optimized": _mean_sem(e_optimized),
        "count": len(rows),
        "settings": dict(vars(settings)),
        "definition": DEFINITION,
    }


def measure_inference_gap(model: Any, cfg: Any, x: Tensor, y: Tensor, device: torch.device
                          ) -> tuple[dict | None, str | None]:
    """The runner's entry point: (metrics.json entry, None), or (None, why it was skipped). Examples are
    split across ranks and the rows gathered in order."""
    if not supports_gaps(model):
        return None, "the model has no reparameterized amortized posterior (a Gaussian-latent VAE has)"
    s = GapSettings(iwae_k=cfg.iwae_k, samples=cfg.gap_samples, steps=cfg.gap_steps, lr=cfg.gap_lr,
                    opt_samples=cfg.gap_opt_samples)
    x, y = x[:cfg.gap_examples], y[:cfg.gap_examples]
    rank, world = rank_world()
    start, stop = shard_bounds(len(x), rank, world)
    rows = [example_gaps(model, x[i:min(i + cfg.batch_size, stop)].to(device),
                         y[i:min(i + cfg.batch_size, stop)].to(device), s).cpu()
            for i in range(start, stop, cfg.batch_size)]
    entry = summarize(gather_rows(torch.cat(rows) if rows else torch.zeros(0, 3)), s)
    entry["split"] = cfg.split
    return entry, None
