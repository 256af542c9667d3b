"""Gaussian diffusion: noise schedules, the forward process, the training loss and the variational bound.

Notation follows Ho et al. 2020 ("DDPM"). Timesteps are 1..T in the paper; in code a timestep is the
0-based index i = t - 1 into the schedule arrays (the network sees i), so `alphas_cumprod[i]` is
alpha-bar_t. Data live in [-1, 1]. Schedule arithmetic is done in float64 (the bound sums ~T small
KL terms, and 1 - alpha-bar is tiny for small t).

The pieces are functions of tensors and a network `net(x_t, i, y) -> prediction`:
- `NoiseSchedule`: beta_t for the linear (Ho et al. sec. 4) and cosine (Nichol & Dhariwal 2021,
  eq. 17) schedules and every derived quantity.
- `q_sample`: x_t ~ q(x_t | x_0) in closed form (Ho et al. eq. 4).
- `q_posterior`: q(x_{t-1} | x_t, x_0) (eqs. 6-7).
- `diffusion_loss`: L_simple (eq. 14) with an epsilon target or a v target (Salimans & Ho 2022, sec. 4).
- `vlb_terms` / `vlb`: L_T + sum_{t>1} L_{t-1} + L_0 (eq. 5) with the discretized Gaussian decoder
  L_0 (eq. 13), in nats of the discrete data.
- `continuous_log_alpha_bar` / `probability_flow_velocity`: the discrete schedule made continuous and
  the probability-flow ODE of the VP-SDE it defines (Song et al. 2021, eq. 13).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Net = Callable[..., Tensor]


# ---- schedules -------------------------------------------------------------------------------------
def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al. 2020 sec. 4: beta linear from 1e-4 to 0.02 over T = 1000.

    For T != 1000 the end points are rescaled by 1000 / T (as in Nichol & Dhariwal's code) so that a
    short debug schedule still reaches alpha-bar_T ~ 0.
    """
    scale = 1000.0 / timesteps
    return torch.linspace(beta_start * scale, min(beta_end * scale, 0.999), timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021 eq. 17: alpha-bar_t = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2).

    betas are clipped to `max_beta` (their sec. 3.2) to avoid the singularity at t = T.
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=max_beta)


class NoiseSchedule:
    """beta_1..beta_T and every quantity derived from them (float64, cached per device).

    Not an nn.Module on purpose: its arrays must stay float64 whatever precision the model is cast to.
    """

    def __init__(self, betas: Tensor) -> None:
        betas = betas.to(torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with every value in (0, 1)")
        self.timesteps = len(betas)
        ac = torch.cumprod(1 - betas, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = betas * (1 - ac_prev) / (1 - ac)  # beta-tilde_t, Ho et al. eq. 7
        self._cpu = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
            "posterior_variance": post_var,
            # beta-tilde_1 = 0: use beta-tilde_2 there so the log stays finite (only L_0 uses t = 1, and
            # it uses the decoder, not this variance).
            "posterior_log_variance": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),  # eq. 7, coefficient of x_0
            "posterior_mean_coef2": (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),  # coefficient of x_t
            "log_betas": torch.log(betas),
        }
        self._by_device: dict[torch.device, dict[str, Tensor]] = {}

    @classmethod
    def named(cls, name: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
              ) -> NoiseSchedule:
        if name == "linear":
            return cls(linear_betas(timesteps, beta_start, beta_end))
        if name == "cosine":
            return cls(cosine_betas(timesteps))
        raise ValueError(f"unknown noise schedule {name!r} (linear or cosine)")

    def array(self, name: str, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        if device not in self._by_device:
            dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
            self._by_device[device] = {k: v.to(device, dtype) for k, v in self._cpu.items()}
        return self._by_device[device][name]

    def at(self, name: str, i: Tensor, like: Tensor) -> Tensor:
        """schedule[name][i] reshaped to broadcast against `like` ([B, ...]), in float64."""
        values = self.array(name, i.device)[i]
        return values.reshape(-1, *([1] * (like.dim() - 1)))


# ---- forward process and parameterizations ---------------------------------------------------------
def q_sample(schedule: NoiseSchedule, x0: Tensor, i: Tensor, noise: Tensor) -> Tensor:
    """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps (Ho et al. eq. 4)."""
    a = schedule.at("sqrt_alphas_cumprod", i, x0)
    s = schedule.at("sqrt_one_minus_alphas_cumprod", i, x0)
    return (a * x0 + s * noise).to(x0.dtype)


def q_posterior(schedule: NoiseSchedule, x0: Tensor, xt: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7), float64."""
    mean = schedule.at("posterior_mean_coef1", i, xt) * x0 + schedule.at("posterior_mean_coef2", i, xt) * xt
    return mean, schedule.at("posterior_log_variance", i, xt).expand_as(mean)


def v_target(schedule: NoiseSchedule, x0: Tensor, i: Tensor, noise: Tensor) -> Tensor:
    """v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x_0 (Salimans & Ho 2022, sec. 4 / appendix D)."""
    a = schedule.at("sqrt_alphas_cumprod", i, x0)
    s = schedule.at("sqrt_one_minus_alphas_cumprod", i, x0)
    return (a * noise - s * x0).to(x0.dtype)


def predict_x0_eps(schedule: NoiseSchedule, xt: Tensor, i: Tensor, output: Tensor, prediction: str
                   ) -> tuple[Tensor, Tensor]:
    """(x0-hat, eps-hat) in float64 from the network output under the given parameterization."""
    a = schedule.at("sqrt_alphas_cumprod", i, xt)
    s = schedule.at("sqrt_one_minus_alphas_cumprod", i, xt)
    xt, out = xt.double(), output.double()
    if prediction == "eps":
        eps = out
        x0 = (xt - s * eps) / a  # invert eq. 4
    elif prediction == "v":
        x0 = a * xt - s * out  # Salimans & Ho 2022 eq. for x-hat from v
        eps = s * xt + a * out
    elif prediction == "x0":
        x0 = out
        eps = (xt - a * x0) / s
    else:
        raise ValueError(f"unknown prediction {prediction!r} (eps, v or x0)")
    return x0, eps


def p_mean_variance(net: Net, schedule: NoiseSchedule, xt: Tensor, i: Tensor, y: Tensor | None = None, *,
                    prediction: str = "eps", variance: str = "beta", clip_denoised: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, log-variance of p(x_{t-1} | x_t) and x0-hat (float64).

    The mean is the posterior mean at x0-hat (Ho et al. eq. 11 rewritten through x0-hat); the variance
    is fixed (sec. 3.2): sigma_t^2 = beta_t ("beta") or beta-tilde_t ("posterior"); both give similar
    samples, the former a tighter bound on CIFAR-10 in Ho et al.'s experiments.
    """
    x0, _ = predict_x0_eps(schedule, xt, i, net(xt, i, y), prediction)
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    mean, _ = q_posterior(schedule, x0, xt, i)
    if variance == "beta":
        # beta-tilde_1 at t = 1 keeps the first reverse step's variance at the posterior's (Ho et al.'s code).
        logvar = torch.where(i == 0, schedule.array("posterior_log_variance", i.device)[1],
                             schedule.array("log_betas", i.device)[i])
        logvar = logvar.reshape(-1, *([1] * (xt.dim() - 1))).expand_as(mean)
    elif variance == "posterior":
        logvar = schedule.at("posterior_log_variance", i, xt).expand_as(mean)
    else:
        raise ValueError(f"unknown variance {variance!r} (beta or posterior)")
    return mean, logvar, x0


# ---- training loss ---------------------------------------------------------------------------------
def diffusion_loss(net: Net, schedule: NoiseSchedule, x0: Tensor, y: Tensor | None = None, *,
                   prediction: str = "eps") -> tuple[Tensor, Tensor]:
    """L_simple (Ho et al. eq. 14): E_{t, eps} || target - net(x_t, t) ||^2, per example [B], and the t used.

    t ~ Uniform{1..T}; the target is eps (Ho et al.) or v (Salimans & Ho 2022). Mean over dimensions.
    """
    i = torch.randint(0, schedule.timesteps, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    xt = q_sample(schedule, x0, i, noise)
    target = noise if prediction == "eps" else v_target(schedule, x0, i, noise)
    out = net(xt, i, y)
    return (out.float() - target.float()).pow(2).flatten(1).mean(1), i


# ---- the variational bound ---------------------------------------------------------------------------
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)), elementwise, nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def discretized_gaussian_nll(x: Tensor, mean: Tensor, logvar: Tensor, levels: int = 256) -> Tensor:
    """-log of N(mean, exp logvar) integrated over the bin of each discrete value x, elementwise (eq. 13).

    x is on the grid {-1, -1 + 2/(levels-1), ..., 1}; a bin is x +- 1/(levels-1), with the outermost
    bins extended to -inf and +inf so the probabilities of the `levels` values sum to one. Computed
    from log-CDFs so that bins far in a tail stay finite and accurate.
    """
    x, mean, logvar = x.double(), mean.double(), logvar.double()
    half = 1.0 / (levels - 1)
    inv_std = torch.exp(-0.5 * logvar)
    inf = torch.full_like(x, math.inf)
    lo = torch.where(x < -1 + half, -inf, (x - mean - half) * inv_std)  # standardized bin edges
    hi = torch.where(x > 1 - half, inf, (x - mean + half) * inv_std)
    # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi): evaluate on the side where both edges are <= 0 at the
    # upper end, so the difference of two numbers near one never cancels.
    flip = lo > 0
    lo, hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return -(log_hi + torch.log(-torch.expm1(log_lo - log_hi)))


def prior_kl(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example [B], nats (no learned parameters)."""
    i = torch.full((x0.shape[0],), schedule.timesteps - 1, device=x0.device, dtype=torch.long)
    mean = schedule.at("sqrt_alphas_cumprod", i, x0) * x0.double()
    logvar = torch.log1p(-schedule.at("alphas_cumprod", i, x0)).expand_as(mean)
    return normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean)).flatten(1).sum(1)


def vlb_term(net: Net, schedule: NoiseSchedule, x0: Tensor, i: Tensor, y: Tensor | None = None, *,
             prediction: str = "eps", variance: str = "beta", levels: int = 256,
             noise: Tensor | None = None) -> Tensor:
    """The bound's term at timestep index i, per example [B], nats: L_{t-1} for t > 1, L_0 for t = 1.

    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (eq. 5) with x_t ~ q(x_t | x_0);
    L_0 = -log p(x_0 | x_1), the discretized Gaussian decoder (eq. 13). x0 is on the data grid in [-1, 1].
    """
    noise = torch.randn_like(x0) if noise is None else noise
    xt = q_sample(schedule, x0, i, noise)
    mean, logvar, _ = p_mean_variance(net, schedule, xt, i, y, prediction=prediction, variance=variance)
    true_mean, true_logvar = q_posterior(schedule, x0.double(), xt, i)
    kl = normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).sum(1)
    decoder_nll = discretized_gaussian_nll(x0, mean, logvar, levels).flatten(1).sum(1)
    return torch.where(i == 0, decoder_nll, kl)


def vlb(net: Net, schedule: NoiseSchedule, x0: Tensor, y: Tensor | None = None, *, num_timesteps: int = 0,
        prediction: str = "eps", variance: str = "beta", levels: int = 256) -> Tensor:
    """The variational bound -log p(x_0) <= L_T + sum_{t=2}^T L_{t-1} + L_0 (eq. 5), per example [B], nats.

    num_timesteps = 0 evaluates every one of the T terms (T network passes per example). num_timesteps
    = k > 0 is an unbiased Monte-Carlo estimate: k timesteps drawn by stratified sampling over 1..T
    (one uniformly in each of k equal strata), each term weighted by its stratum's size.
    """
    T = schedule.timesteps
    total = prior_kl(schedule, x0)
    if num_timesteps <= 0 or num_timesteps >= T:
        for step in range(T):
            i = torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)
            total = total + vlb_term(net, schedule, x0, i, y, prediction=prediction, variance=variance,
                                     levels=levels)
        return total
    edges = torch.linspace(0, T, num_timesteps + 1).round().long()
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        i = torch.randint(lo, hi, (x0.shape[0],), device=x0.device)
        term = vlb_term(net, schedule, x0, i, y, prediction=prediction, variance=variance, levels=levels)
        total = total + (hi - lo) * term
    return total


# ---- the probability-flow ODE ----------------------------------------------------------------------
def continuous_log_alpha_bar(schedule: NoiseSchedule, tau: Tensor) -> tuple[Tensor, Tensor]:
    """log alpha-bar at fractional timestep indices tau in [0, T-1], and its derivative d/dtau (float64).

    A monotone cubic Hermite interpolant (Fritsch & Carlson 1980: slopes the harmonic mean of the
    neighbouring secants) through log alpha-bar_i at the integer indices: exact there, continuously
    differentiable, and decreasing, so beta(tau) = -d log alpha-bar / dtau is continuous and positive.
    (Piecewise-linear interpolation would make beta jump at every index, and an adaptive solver would
    shrink its steps at each of the T jumps.)
    """
    if schedule.timesteps < 2:
        raise ValueError("the probability-flow ODE needs at least 2 timesteps")
    knots = torch.log(schedule.array("alphas_cumprod", tau.device))
    secant = knots[1:] - knots[:-1]  # all < 0
    slopes = torch.cat([secant[:1], 2 / (1 / secant[:-1] + 1 / secant[1:]), secant[-1:]])
    tau = tau.double().clamp(0, schedule.timesteps - 1)
    j = tau.floor().long().clamp(max=schedule.timesteps - 2)
    u = tau - j
    p0, p1, m0, m1 = knots[j], knots[j + 1], slopes[j], slopes[j + 1]
    value = ((2 * u**3 - 3 * u**2 + 1) * p0 + (u**3 - 2 * u**2 + u) * m0 + (-2 * u**3 + 3 * u**2) * p1
             + (u**3 - u**2) * m1)
    slope = (6 * u**2 - 6 * u) * (p0 - p1) + (3 * u**2 - 4 * u + 1) * m0 + (3 * u**2 - 2 * u) * m1
    return value, slope


def probability_flow_velocity(net: Net, schedule: NoiseSchedule, x: Tensor, s: Tensor, y: Tensor | None = None,
                              *, prediction: str = "eps") -> Tensor:
    """dx/ds of the probability-flow ODE at diffusion times s [B] in [0, 1] (s = 0: the data end).

    s maps to the fractional timestep index tau = s (T-1), which the network sees (Song et al. 2021
    evaluate their DDPM checkpoints the same way, at t (N-1)); with alpha-bar(s) from
    `continuous_log_alpha_bar`, beta(s) = -d log alpha-bar / ds and sigma(s) = sqrt(1 - alpha-bar(s)),
    the VP-SDE dx = -beta x ds / 2 + sqrt(beta) dw has the marginals q(x_t | x_0) of the schedule and
    the probability-flow ODE dx/ds = -beta(s) (x + score) / 2 with score = -eps-hat / sigma (eq. 13).
    s = 0 is timestep 1 (alpha-bar_1 = 1 - beta_1), the least-noised level the network was trained on.
    """
    tau = s.double() * (schedule.timesteps - 1)
    log_ab, dlog_ab = continuous_log_alpha_bar(schedule, tau)
    shape = (-1, *([1] * (x.dim() - 1)))
    beta = (-dlog_ab * (schedule.timesteps - 1)).reshape(shape)
    a, sigma = torch.exp(0.5 * log_ab).reshape(shape), torch.sqrt(-torch.expm1(log_ab)).reshape(shape)
    out = net(x, tau.to(x.dtype), y).to(x.dtype)
    if prediction == "eps":
        eps = out
    elif prediction == "v":
        eps = sigma.to(x.dtype) * x + a.to(x.dtype) * out  # Salimans & Ho 2022, as in predict_x0_eps
    else:
        raise ValueError(f"unknown prediction {prediction!r} (eps or v)")
    return (-0.5 * beta).to(x.dtype) * (x - eps / sigma.to(x.dtype))
