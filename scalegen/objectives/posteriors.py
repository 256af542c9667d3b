"""Approximate posteriors q(z|x) of a Gaussian latent: samples z and their log-density log q(z|x).

The encoder emits one flat parameter vector per example; `param_dim` says how long it is for each kind:

- diagonal: [mu, logvar] (mean-field Gaussian).
- full:     [mu, logvar, A]: z = mu + (I + A) (sigma * eps) with sigma = exp(logvar / 2) and A strictly
            lower triangular (its D(D-1)/2 free entries): a full-covariance Gaussian, Sigma = L L^T with
            L = (I + A) diag(sigma), one linear IAF step (Kingma et al. 2016, sec. 4). A is relative to the
            scales sigma, so a step on it moves z by a fraction of sigma, not by an absolute amount that
            swamps posteriors of small variance (docs/families.md measures both).
- planar:   [mu, logvar, (u, w, b) per step]: the diagonal Gaussian pushed through planar maps
            f(z) = z + u' tanh(w.z + b) (Rezende & Mohamed 2015, eq. 10-12; u' keeps f invertible, App. A.1).
- iaf:      [mu, logvar, h]: the diagonal Gaussian pushed through inverse autoregressive steps
            z <- sigma * z + (1 - sigma) * m, [m, logit sigma] = MADE_t(z, h), the order reversed between
            steps (Kingma et al. 2016, eq. 13-14; the MADE networks are passed in as `steps`).

Change of variables: log q(z_T) = log q_0(z_0) - sum_t log |det df_t/dz|.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("diagonal", "full", "planar", "iaf")
LOG_2PI = math.log(2 * math.pi)

Step = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (z, context) -> (mean, gate_logit)


def param_dim(kind: str, dim: int, flow_steps: int = 0, context_dim: int = 0) -> int:
    """Length of the per-example parameter vector the encoder emits for posterior `kind`."""
    extra = {"diagonal": 0, "full": dim * (dim - 1) // 2, "planar": flow_steps * (2 * dim + 1),
             "iaf": context_dim}
    return 2 * dim + extra[kind]


def scale_tril(logvar: Tensor, offdiag: Tensor) -> Tensor:
    """[B, D, D] lower-triangular L = (I + A) diag(sigma), sigma = exp(logvar / 2), with `offdiag`
    [B, D(D-1)/2] the entries of the strictly lower-triangular A, row by row."""
    d = logvar.shape[-1]
    rows, cols = torch.tril_indices(d, d, -1, device=logvar.device)
    unit = torch.eye(d, dtype=logvar.dtype, device=logvar.device).expand(len(logvar), d, d)
    unit = unit.index_put((torch.arange(len(logvar), device=logvar.device)[:, None], rows, cols), offdiag,
                          accumulate=True)
    return unit * (0.5 * logvar).exp().unsqueeze(-2)


def full_gaussian_kl(params: Tensor, prior_mu: Tensor | float = 0.0, prior_logvar: Tensor | float = 0.0) -> Tensor:
    """KL( N(mu, L L^T) || N(prior_mu, diag e^prior_logvar) ) per example, closed form, for "full" params:
    (tr(S^-1 Sigma) + (mu - m)^T S^-1 (mu - m) - D + log det S - log det Sigma) / 2, S the prior's covariance."""
    d = (math.isqrt(8 * params.shape[-1] + 9) - 3) // 2  # params has 2D + D(D-1)/2 entries
    mu, logvar, off = params[:, :d], params[:, d:2 * d], params[:, 2 * d:]
    L = scale_tril(logvar, off)
    prior_logvar = torch.as_tensor(prior_logvar, dtype=mu.dtype, device=mu.device).expand_as(mu)
    inv_var = (-prior_logvar).exp()
    trace = ((L ** 2).sum(-1) * inv_var).sum(-1)  # diag(Sigma)_i = sum_j L_ij^2
    return 0.5 * (trace + ((mu - prior_mu) ** 2 * inv_var).sum(-1) - d + prior_logvar.sum(-1) - logvar.sum(-1))


def planar_step(z: Tensor, u: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """f(z) = z + u' tanh(w.z + b) and log |det df/dz| = log(1 + (1 - tanh^2) w.u'), where
    u' = u + (softplus(w.u) - 1 - w.u) w / |w|^2 makes w.u' > -1 (invertible). z [..., D], u, w [..., D]."""
    wu = (w * u).sum(-1, keepdim=True)
    u_hat = u + (F.softplus(wu) - 1 - wu) * w / (w * w).sum(-1, keepdim=True).clamp(min=1e-12)
    h = torch.tanh((z * w).sum(-1, keepdim=True) + b)
    w_u_hat = (w * u_hat).sum(-1)  # = softplus(w.u) - 1 > -1
    logdet = torch.log1p((1 - h.squeeze(-1) ** 2) * w_u_hat)
    return z + u_hat * h, logdet


def iaf_step(z: Tensor, mean: Tensor, gate_logit: Tensor) -> tuple[Tensor, Tensor]:
    """z' = sigma z + (1 - sigma) m with sigma = sigmoid(gate): the Jacobian is triangular (m, sigma depend
    on earlier coordinates only), so log |det| = sum log sigma."""
    sigma = torch.sigmoid(gate_logit)
    return sigma * z + (1 - sigma) * mean, F.logsigmoid(gate_logit).sum(-1)


def transform(kind: str, params: Tensor, eps: Tensor, steps: Sequence[Step] = ()) -> tuple[Tensor, Tensor]:
    """Map standard-normal noise eps [k, B, D] to z [k, B, D]; returns (z, log |det dz/deps|) [k, B]."""
    d = eps.shape[-1]
    mu, logvar, rest = params[:, :d], params[:, d:2 * d], params[:, 2 * d:]
    logdet = 0.5 * logvar.sum(-1).expand(eps.shape[:-1])
    if kind == "full":
        z = mu + torch.einsum("bij,kbj->kbi", scale_tril(logvar, rest), eps)
        return z, logdet
    z = mu + eps * (0.5 * logvar).exp()
    if kind == "planar":
        for u, w, b in (t.split([d, d, 1], -1) for t in rest.split(2 * d + 1, -1)):
            z, ld = planar_step(z, u, w, b)
            logdet = logdet + ld
    elif kind == "iaf":
        for step in steps:
            z, ld = iaf_step(z, *step(z, rest.expand(*z.shape[:-1], rest.shape[-1])))
            logdet = logdet + ld
            z = z.flip(-1)  # reverse the order so the next step conditions the other way round
    elif kind != "diagonal":
        raise ValueError(f"unknown posterior {kind!r}; one of {', '.join(KINDS)}")
    return z, logdet


def sample(kind: str, params: Tensor, k: int, dim: int, steps: Sequence[Step] = ()) -> tuple[Tensor, Tensor]:
    """k samples z ~ q(z|x) [k, B, D] and log q(z|x) [k, B] (reparameterized: differentiable in params)."""
    d = dim
    eps = torch.randn(k, len(params), d, device=params.device, dtype=params.dtype)
    z, logdet = transform(kind, params, eps, steps)
    log_q0 = -0.5 * (d * LOG_2PI + (eps ** 2).sum(-1))
    return z, log_q0 - logdet
