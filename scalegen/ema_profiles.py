"""Power-function EMA profiles and their post-hoc reconstruction (Karras et al. 2024, EDM2, sec. 3, app. C).

A power-function EMA with exponent gamma averages the training weights theta_tau, tau in [0, t], with the
profile (EDM2 eq. 2)

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),    0 <= tau <= t,

which as a recursion over optimizer steps is (EDM2 eq. 7, t_delta = 1 step)

    ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t,    beta_t = (1 - 1/t)^(gamma + 1).

Step i of t then carries the weight (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1), exactly the integral of
p_t over (i-1, i] (the product of the betas telescopes), so the continuous profiles below describe the
discrete averages exactly when theta is held constant within a step. Its width is the standard deviation of
p relative to t, sigma_rel (EDM2 eq. 3). Snapshots of a few EMAs at many times t_k span a space of profiles;
the EMA of any other (gamma, t) is reconstructed as the least-squares combination of the snapshots'
profiles (EDM2 app. C.2: inner products of two power functions in closed form, a linear system).
`discrete_weights` gives the per-step weights of a profile, for checking a reconstruction step by step.

Pure NumPy in float64: no Lightning, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# sigma_rel of gamma = 0, the uniform average over [0, t]: a wider profile would weight early weights more
# than late ones, which no one wants (and sigma_rel has no real gamma >= 0 beyond it).
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of p (EDM2 eq. 3): sqrt((g+1) / ((g+2)^2 (g+3)))."""
    if gamma <= -1:
        raise ValueError(f"power-function EMA exponent must be > -1, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative std `sigma_rel` in (0, 1/sqrt(12)] (EDM2 Alg. 2:
    eq. 3 squared is the cubic g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0; its largest real root)."""
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}], got {sigma_rel}")
    inv = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return max(0.0, float(roots[np.abs(roots.imag) < 1e-9].real.max()))


def power_beta(step: int, gamma: float, delta: int = 1) -> float:
    """Decay of the update after optimizer step `step` >= 1, `delta` steps after the previous update:
    (1 - delta/step)^(gamma + 1) (EDM2's t_delta form). 0 for the first update (delta = step), so the
    average starts at the weights then, whatever it held before. With updates at steps t_1 < t_2 < ...
    the products telescope: the weights of update j get (t_j^(g+1) - t_(j-1)^(g+1)) / t^(g+1), the
    profile's integral over (t_(j-1), t_j], whatever the spacing (every-k updates, steps that jump)."""
    return (1.0 - delta / step) ** (gamma + 1.0)


def discrete_weights(t: int, gamma: float, length: int | None = None) -> np.ndarray:
    """Weight of the weights after step i = 1..length (default t) in the recursion's average at step t:
    (i^(g+1) - (i-1)^(g+1)) / t^(g+1) for i <= t, 0 after; they sum to 1."""
    i = np.arange(1, (length or t) + 1, dtype=np.float64)
    w = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / float(t) ** (gamma + 1)
    return np.where(i <= t, w, 0.0)


def profile_inner(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> = integral of p_{t_a,g_a}(tau) p_{t_b,g_b}(tau) dtau, broadcast over the arguments.

    For t_a <= t_b (the product vanishes beyond the shorter support):
        (g_a + 1)(g_b + 1) / (g_a + g_b + 1) * (t_a / t_b)^g_b / t_b,
    and symmetrically otherwise (EDM2 app. C.2, `power_function_correlation`)."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    short, long_ = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g_long = np.where(t_a <= t_b, g_b, g_a)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (short / long_) ** g_long / long_


def solve_weights(
    steps: Sequence[float], gammas: Sequence[float], target_step: float, target_gamma: float
) -> tuple[np.ndarray, float]:
    """Coefficients x over the snapshots (step t_k, exponent g_k) whose combination sum_k x_k p_k is the
    least-squares fit of the profile p of (target_step, target_gamma), and the fit's relative L2 error
    ||sum_k x_k p_k - p|| / ||p||.

    EDM2 app. C.2 solves the normal equations A x = b, A_jk = <p_j, p_k>, b_k = <p_k, p>. Here the fit is
    also constrained to sum_k x_k = 1 (a Lagrange multiplier; the profiles all integrate to 1), so the
    reconstruction is an affine combination of weights: it never rescales them (the unconstrained x sum to
    1 +- 1% with few snapshots, a 1% change of every weight's scale), and its error is sum_i e_i (theta_i
    - theta_T) with sum_i e_i = 0, bounded by ||e||_1 max_i ||theta_i - theta_T||. Solved by least squares:
    A is ill-conditioned when snapshots are dense, and lstsq takes the minimum-norm solution."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    n = len(t)
    gram = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, target_step, target_gamma)
    kkt = np.block([[gram, np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    x = np.linalg.lstsq(kkt, np.append(b, 1.0), rcond=None)[0][:n]
    norm2 = float(profile_inner(target_step, target_gamma, target_step, target_gamma))
    residual2 = norm2 - 2.0 * float(x @ b) + float(x @ gram @ x)
    return x, math.sqrt(max(residual2, 0.0) / norm2)
