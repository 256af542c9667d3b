"""GAN objectives as functions of discriminator logits (and, for penalties, of the discriminator).

Conventions: `d_real`, `d_fake` are raw logits D(x) [B]; every loss is a mean over the batch.

- Non-saturating (Goodfellow et al. 2014, sec. 3): the discriminator minimizes the cross-entropy
  -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))); the generator minimizes -log sigmoid(D(G(z)))
  instead of log(1 - sigmoid(D(G(z)))), which saturates early in training. For a fixed G the optimal
  discriminator is sigmoid(D*(x)) = p_data(x) / (p_data(x) + p_g(x)) (their Proposition 1).
- Minimax (Goodfellow et al. 2014, eq. 1 as written): the same discriminator; the generator minimizes
  log(1 - sigmoid(D(G(z)))), whose gradient in the logit, -sigmoid(D(G(z))), vanishes when D rejects
  the fakes confidently, as it does early in training (the reason for the non-saturating form;
  measured in docs/families.md).
- Wasserstein (Arjovsky et al. 2017, eq. 3): the critic D (a real-valued function, kept near
  1-Lipschitz by weight clipping or the gradient penalty) maximizes E D(x) - E D(G(z)), the
  Kantorovich-Rubinstein dual estimate of the earth mover's distance W1(p_data, p_g) (`critic_emd`); it
  minimizes the negative, and the generator minimizes -E D(G(z)).
- Hinge (Lim & Ye 2017; Miyato et al. 2018 eq. 16): D minimizes relu(1 - D(x)) + relu(1 + D(G(z)));
  G minimizes -D(G(z)). The optimal hinge discriminator is sign(p_data - p_g) where the densities
  differ (clipped to [-1, 1]).
- R1 (Mescheder et al. 2018, eq. 9): gamma/2 E_{p_data} ||grad_x D(x)||^2, on real data only.
- Gradient penalty (Gulrajani et al. 2017, eq. 3 / Algorithm 1): lambda E (||grad D(x_hat)|| - 1)^2 at
  random interpolates x_hat between real and fake.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("non_saturating", "minimax", "hinge", "wasserstein")


def discriminator_loss(d_real: Tensor, d_fake: Tensor, kind: str = "non_saturating") -> Tensor:
    if kind in ("non_saturating", "minimax"):  # binary cross-entropy, real = 1, fake = 0 (softplus is stable)
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    if kind == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    if kind == "wasserstein":  # -(E D(x) - E D(G(z))): the critic maximizes the EMD estimate
        return -critic_emd(d_real, d_fake)
    raise ValueError(f"unknown GAN loss {kind!r} ({', '.join(LOSSES)})")


def generator_loss(d_fake: Tensor, kind: str = "non_saturating") -> Tensor:
    if kind == "non_saturating":  # -log sigmoid(D(G(z)))
        return F.softplus(-d_fake).mean()
    if kind == "minimax":  # log(1 - sigmoid(D(G(z)))) = -softplus(D(G(z)))
        return -F.softplus(d_fake).mean()
    if kind in ("hinge", "wasserstein"):
        return -d_fake.mean()
    raise ValueError(f"unknown GAN loss {kind!r} ({', '.join(LOSSES)})")


def critic_emd(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """E D(x) - E D(G(z)): for a 1-Lipschitz critic a lower bound on W1(p_data, p_g), equal at the best
    critic (Kantorovich-Rubinstein duality; Arjovsky et al. 2017 Theorem 3). With clipping the critic is
    K-Lipschitz for an unknown K, so the estimate is W1 up to that scale."""
    return d_real.float().mean() - d_fake.float().mean()


@torch.no_grad()
def clip_weights(module: torch.nn.Module, c: float) -> None:
    """Clamp every parameter of the critic to [-c, c] (Arjovsky et al. 2017 Algorithm 1, c = 0.01)."""
    for p in module.parameters():
        p.clamp_(-c, c)


def _grad_sq_norm(outputs: Tensor, inputs: Tensor) -> Tensor:
    # create_graph: the penalty is differentiated again with respect to D's parameters.
    (grad,) = torch.autograd.grad(outputs.float().sum(), inputs, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1)


def r1_penalty(d_real: Tensor, x_real: Tensor) -> Tensor:
    """E ||grad_x D(x)||^2 over the real batch (x_real must require grad and have produced d_real).

    Multiply by gamma / 2 for Mescheder et al. 2018 eq. 9.
    """
    return _grad_sq_norm(d_real, x_real).mean()


def gradient_penalty(discriminator: Callable[[Tensor], Tensor], x_real: Tensor, x_fake: Tensor) -> Tensor:
    """E (||grad D(x_hat)||_2 - 1)^2, x_hat = u x_real + (1 - u) x_fake, u ~ U[0, 1] per example (WGAN-GP).

    Multiply by lambda (10 in Gulrajani et al. 2017).
    """
    u = torch.rand(x_real.shape[0], *([1] * (x_real.dim() - 1)), device=x_real.device, dtype=x_real.dtype)
    x_hat = (u * x_real.detach() + (1 - u) * x_fake.detach()).requires_grad_(True)
    norm = (_grad_sq_norm(discriminator(x_hat), x_hat) + 1e-12).sqrt()
    return (norm - 1).pow(2).mean()
