"""Variational autoencoders: Gaussian latent, MLP or conv networks, Bernoulli / discretized logistic /
discretized Gaussian likelihoods; beta-VAE, conditional VAE and the IWAE bound by configuration.

Options (docs/families.md): the posterior family (`posterior`: diagonal, full covariance, planar or IAF
flows; scalegen.objectives.posteriors), a second stochastic layer (`latent2_dim`, Burda et al. 2016) and
discrete latents (`latent`: Bernoulli or categorical, trained by the score-function estimator with NVIL's
control variates or the Gumbel-softmax relaxation; scalegen.objectives.discrete)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scalegen.config.schema import ModelConfig, OptimConfig, choice, ranged
from scalegen.dataspec import DataSpec
from scalegen.errors import ConfigError
from scalegen.families.base import GenerativeModel
from scalegen.nets.conv import ConvDecoder, ConvEncoder
from scalegen.nets.made import MADE
from scalegen.nets.mlp import MLP
from scalegen.objectives import discrete, posteriors
from scalegen.objectives.elbo import (
    bernoulli_log_prob,
    discretized_log_prob,
    gaussian_kl,
    iwae_bound,
    log_normal,
)
from scalegen.registry import register_family
from scalegen.samplers.completion import complete_latent, paste


@dataclass
class VAEConfig(ModelConfig):
    family: str = "vae"
    net: str = choice("mlp", "conv")  # encoder/decoder architecture
    hidden: list[int] = ranged(ge=1, default_factory=lambda: [512, 256])  # MLP widths, or conv channels per stride 2
    latent_dim: int = ranged(16, ge=1)  # dimension of the Gaussian latent z
    likelihood: str = choice("bernoulli", "logistic", "gaussian")  # p(x|z); logistic/gaussian are discretized to 8 bits
    binarize: str = choice("dynamic", "static", "threshold")  # bernoulli: how pixels become {0,1} in training
    beta: float = ranged(1.0, ge=0)  # weight of the KL term (beta-VAE, Higgins et al. 2017); 1 = the ELBO
    kl_warmup_steps: int = ranged(0, ge=0)  # ramp the KL weight linearly from 0 to beta over this many steps
    conditional: bool = False  # condition encoder, decoder and prior on the label (Sohn et al. 2015)
    iwae_k: int = ranged(1, ge=1)  # importance samples in training: 1 = ELBO, >1 = IWAE (Burda et al. 2016)
    min_log_scale: float = ranged(-7.0)  # floor of the decoder's per-pixel log-scale (logistic/gaussian)
    # Richer Gaussian posteriors (scalegen.objectives.posteriors).
    posterior: str = choice("diagonal", "full", "planar", "iaf")  # q(z|x): mean-field, full covariance, flows
    flow_steps: int = ranged(4, ge=1)  # planar / iaf: flow steps after the diagonal Gaussian
    flow_hidden: int = ranged(128, ge=1)  # iaf: MADE width and size of the context h from the encoder
    # Two stochastic layers x -> z1 -> z2 (Burda et al. 2016, section 5): z1 is latent_dim.
    latent2_dim: int = ranged(0, ge=0)  # size of the top latent z2; 0 = one stochastic layer
    hidden2: list[int] = ranged(None, ge=1, default_factory=lambda: [100, 100])  # deterministic widths z1 <-> z2
    # Discrete latents (scalegen.objectives.discrete): latent_dim bits, or latent_dim variables of K classes.
    latent: str = choice("gaussian", "bernoulli", "categorical")  # type of z; discrete priors are uniform
    categories: int = ranged(10, ge=2)  # categorical: classes K per latent variable
    # Discrete-latent gradient estimator: nvil = score function with a moving-average and a learned baseline and
    # variance normalization; reinforce = no control variate; reinforce_ma = moving-average baseline only;
    # gumbel / gumbel_st = the Concrete relaxation, relaxed or straight-through.
    estimator: str = choice("nvil", "reinforce", "reinforce_ma", "gumbel", "gumbel_st")  # discrete-latent gradient
    baseline_decay: float = ranged(0.9, ge=0, lt=1)  # nvil/reinforce_ma: moving-average decay
    baseline_hidden: int = ranged(100, ge=1)  # nvil: width of the input-dependent baseline MLP b(x)
    temperature: float = ranged(1.0, gt=0)  # gumbel: initial relaxation temperature tau
    temperature_min: float = ranged(0.5, gt=0)  # gumbel: tau = max(min, start * exp(-decay * step))
    temperature_decay: float = ranged(0.0, ge=0)  # gumbel: per-step annealing rate (Jang et al.: 1e-5..1e-4)
    grad_var_every: int = ranged(0, ge=0)  # encoder grad variance every N steps (multiple of log_every_n_steps); 0: off
    grad_var_samples: int = ranged(8, ge=2)  # latent draws per gradient-variance measurement
    complete_steps: int = ranged(50, ge=1)  # `complete`: encode-decode iterations (Rezende et al. 2014 sec. 6)


def _static_uniform(x: Tensor) -> Tensor:
    """Uniform(0,1) noise that is a fixed function of each image's content (static binarization).

    A vectorized integer hash of (image content, pixel index): the same image always gets the same noise,
    on any device and in any batch."""
    flat = x.flatten(1).long()
    weights = torch.arange(1, flat.shape[1] + 1, device=x.device)
    content = (flat * weights).sum(1, keepdim=True) * 2654435761
    h = (content + weights * 40503) & 0xFFFFFFFF
    for _ in range(3):  # xorshift-multiply rounds to decorrelate neighbouring pixels
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return (h.float() / 2**32).view_as(x)


@register_family("vae", VAEConfig, "Variational autoencoder (beta, conditional, IWAE)")
class VAE(GenerativeModel):
    """Variational autoencoder with a Gaussian latent (Kingma & Welling 2014)."""

    nll_kind = "elbo"  # nll(x, k=1) is the negative ELBO; nll(x, k>1) the IWAE-k bound
    predictions = frozenset({"nll", "sample", "encode", "reconstruct", "complete"})
    data_kinds = frozenset({"image"})
    latent_prior = "gaussian"  # decode_latent inverts encode's space, z ~ N: eval's latent figures (slerp)

    def __init__(self, cfg: VAEConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        if cfg.iwae_k > 1 and cfg.beta != 1.0:
            raise ConfigError("model.beta applies to the ELBO only: set model.iwae_k=1 or model.beta=1")
        gaussian = cfg.latent == "gaussian"
        if not gaussian and (cfg.posterior != "diagonal" or cfg.latent2_dim or cfg.conditional):
            raise ConfigError(f"model.latent={cfg.latent} has its own posterior, one layer and no label: set "
                              "model.posterior=diagonal, model.latent2_dim=0 and model.conditional=false")
        if cfg.latent2_dim and cfg.conditional:
            raise ConfigError("model.latent2_dim>0 has no conditional prior yet: set model.conditional=false")
        c, h, w = data.shape
        cond = data.num_classes if cfg.conditional else 0
        out_per_pixel = 1 if cfg.likelihood == "bernoulli" else 2
        d = cfg.latent_dim
        if gaussian:
            enc_out = posteriors.param_dim(cfg.posterior, d, cfg.flow_steps, cfg.flow_hidden)
            z_dim = d
        else:
            enc_out = z_dim = d if cfg.latent == "bernoulli" else d * cfg.categories
        if cfg.net == "mlp":
            self.encoder = MLP(data.dims + cond, cfg.hidden, enc_out)
            self.decoder = MLP(z_dim + cond, list(reversed(cfg.hidden)), out_per_pixel * data.dims)
        else:
            self.encoder = ConvEncoder(c, (h, w), cfg.hidden, enc_out, extra_dim=cond)
            self.decoder = ConvDecoder(z_dim + cond, out_per_pixel * c, (h, w), cfg.hidden)
        if gaussian and cfg.posterior in ("full", "iaf"):  # the extra outputs start at 0: L diagonal, context 0
            head = self.encoder.net[-1] if cfg.net == "mlp" else self.encoder.head
            with torch.no_grad():
                head.weight[2 * d:].zero_()
                head.bias[2 * d:].zero_()
        # IAF: one MADE per step, shared by all examples; the encoder's h makes each step depend on x.
        self.flows = nn.ModuleList(
            [MADE(d, cfg.flow_hidden, cfg.flow_hidden) for _ in range(cfg.flow_steps if cfg.posterior == "iaf" else 0)]
        )
        # Second stochastic layer: q(z2|z1) and p(z1|z2), diagonal Gaussians; p(z2) = N(0, I).
        self.enc2 = MLP(d, cfg.hidden2, 2 * cfg.latent2_dim) if cfg.latent2_dim else None
        self.dec2 = MLP(cfg.latent2_dim, list(reversed(cfg.hidden2)), 2 * d) if cfg.latent2_dim else None
        # Score-function control variates: running averages, and NVIL's learned baseline b(x).
        score = not gaussian and cfg.estimator in ("nvil", "reinforce", "reinforce_ma")
        self.control = (discrete.ControlVariates(cfg.baseline_decay, normalize=cfg.estimator == "nvil")
                        if score and cfg.estimator != "reinforce" else None)
        self.baseline = (MLP(data.dims, [cfg.baseline_hidden], 1)
                         if not gaussian and cfg.estimator == "nvil" else None)
        # Conditional prior p(z|y) = N(mu_y, diag e^logvar_y); unconditional prior is N(0, I).
        self.prior = nn.Embedding(data.num_classes, 2 * cfg.latent_dim) if cfg.conditional else None
        if self.prior is not None:
            nn.init.zeros_(self.prior.weight)

    @property
    def reparameterized_posterior(self) -> bool:
        """Whether log_weights is differentiable in posterior_params (scalegen.eval.gaps): Gaussian latents."""
        return self.cfg.latent == "gaussian"

    # ---- pieces ---------------------------------------------------------------------------------
    def _onehot(self, y: Tensor | None, n: int) -> Tensor | None:
        if not self.cfg.conditional:
            return None
        if y is None or (y < 0).any():
            raise ConfigError("model.conditional=true needs a label for every example (data without labels: "
                              "set model.conditional=false)")
        return F.one_hot(y, self.data_spec.num_classes).float()

    def _encoder_out(self, x01: Tensor, y1h: Tensor | None) -> Tensor:
        """The posterior's parameters [B, P] (see scalegen.objectives.posteriors), or discrete logits."""
        if self.cfg.net == "mlp":
            inp = x01.flatten(1) if y1h is None else torch.cat([x01.flatten(1), y1h], 1)
            return self.encoder(inp)
        return self.encoder(x01, y1h)

    def _posterior(self, x01: Tensor, y1h: Tensor | None) -> tuple[Tensor, Tensor]:
        out = self._encoder_out(x01, y1h)
        d = self.cfg.latent_dim
        return out[:, :d], out[:, d:2 * d]

    def _logits(self, params: Tensor) -> Tensor:
        """Discrete latents: the encoder's logits, [B, D] (Bernoulli) or [B, D, K] (categorical)."""
        return params if self.cfg.latent == "bernoulli" else params.view(len(params), -1, self.cfg.categories)

    def _prior(self, y1h: Tensor | None, n: int) -> tuple[Tensor | float, Tensor | float]:
        if self.prior is None:
            return 0.0, 0.0
        mu, logvar = (y1h @ self.prior.weight).chunk(2, 1)
        return mu, logvar

    def _decode(self, z: Tensor, y1h: Tensor | None) -> Tensor:
        z = z.flatten(1)  # categorical one-hots [B, D, K] enter the decoder as D*K inputs
        inp = z if y1h is None else torch.cat([z, y1h], -1)
        return self.decoder(inp).view(len(z), -1, *self.data_spec.shape)

    def _targets(self, x: Tensor, train: bool) -> tuple[Tensor, Tensor]:
        """(encoder input in [0,1], likelihood target): binarized for bernoulli, raw uint8 otherwise."""
        if self.cfg.likelihood != "bernoulli":
            return x.float() / 255, x
        p = x.float() / 255
        mode = self.cfg.binarize if train else ("threshold" if self.cfg.binarize == "threshold" else "static")
        if mode == "dynamic":
            xb = (torch.rand_like(p) < p).float()
        elif mode == "static":
            xb = (_static_uniform(x) < p).float()
        else:
            xb = (p > 0.5).float()
        return xb, xb

    def _log_px_z(self, target: Tensor, out: Tensor) -> Tensor:
        if self.cfg.likelihood == "bernoulli":
            return bernoulli_log_prob(target, out[:, 0])
        mean, log_scale = out[:, 0], out[:, 1].clamp(min=self.cfg.min_log_scale)
        return discretized_log_prob(target, mean, log_scale, self.cfg.likelihood)

    def _mean_image(self, out: Tensor) -> Tensor:
        if self.cfg.likelihood == "bernoulli":
            m = torch.sigmoid(out[:, 0])
        else:
            m = (out[:, 0].clamp(-1, 1) + 1) / 2
        return (m * 255).round().clamp(0, 255).to(torch.uint8)

    def posterior_params(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The encoder's output for x: q(z|x)'s parameters [B, P] (what per-example optimization refines)."""
        inp, _ = self._targets(x, train=False)
        return self._encoder_out(inp, self._onehot(y, len(x)))

    def log_weights(self, x: Tensor, y: Tensor | None, k: int, train: bool = False,
                    params: Tensor | None = None) -> Tensor:
        """log p(x, z_k) - log q(z_k | x) for k samples z_k ~ q: shape [k, B]. `params` replaces the
        encoder's output (the posterior parameters, see `posterior_params`)."""
        inp, target = self._targets(x, train)
        return self._log_weights(inp, target, self._onehot(y, len(x)), k, params)

    def _log_weights(self, inp: Tensor, target: Tensor, y1h: Tensor | None, k: int,
                     params: Tensor | None = None) -> Tensor:
        if params is None:
            params = self._encoder_out(inp, y1h)
        rep = lambda t: None if t is None else t.repeat(k, *([1] * (t.dim() - 1)))
        z, log_pz, log_q = self._latents(params, y1h, k)
        out = self._decode(z.reshape(k * len(inp), *z.shape[2:]), rep(y1h))
        log_px = self._log_px_z(rep(target), out).view(k, len(inp))
        return log_px + log_pz - log_q

    def _latents(self, params: Tensor, y1h: Tensor | None, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """k samples of the decoder's latent [k, B, ...] with log p(z) and log q(z|x) of all layers [k, B]."""
        cfg = self.cfg
        if cfg.latent != "gaussian":  # exact discrete samples (the bound; training uses the estimators)
            logits = self._logits(params)
            z, log_q = discrete.sample_latent(logits.expand(k, *logits.shape), cfg.latent)
            log_prior = discrete.uniform_log_prior(cfg.latent, cfg.latent_dim, cfg.categories)
            return z, torch.full_like(log_q, log_prior), log_q
        z, log_q = posteriors.sample(cfg.posterior, params, k, cfg.latent_dim, self.flows)
        if self.enc2 is None:
            pmu, plogvar = self._prior(y1h, len(params))
            return z, log_normal(z, pmu, plogvar), log_q
        # z2 ~ q(z2|z1), log p(z1|z2) + log p(z2) - log q(z2|z1) (Burda et al. 2016, section 5).
        mu2, logvar2 = self.enc2(z.reshape(-1, cfg.latent_dim)).view(*z.shape[:2], -1).chunk(2, -1)
        z2 = mu2 + torch.randn_like(mu2) * (0.5 * logvar2).exp()
        pmu1, plogvar1 = self.dec2(z2.reshape(-1, cfg.latent2_dim)).view(*z.shape[:2], -1).chunk(2, -1)
        log_pz = log_normal(z, pmu1, plogvar1) + log_normal(z2, 0.0, 0.0)
        return z, log_pz, log_q + log_normal(z2, mu2, logvar2)

    # ---- the family contract --------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch["x"], batch.get("y")
        inp, target = self._targets(x, self.training)
        loss, logs = self._objective(inp, target, y, update=self.training)
        every = self.cfg.grad_var_every
        # On the steps the loggers write ((step + 1) % log_every_n_steps == 0): make N a multiple of it.
        if self.training and every and (self.global_step + 1) % every == 0 and self.logs_this_step():
            logs["enc_grad_var"] = self.encoder_gradient_variance(inp, target, y)
        return loss, logs

    def _beta(self) -> float:
        warm = min(1.0, self.global_step / self.cfg.kl_warmup_steps) if self.cfg.kl_warmup_steps else 1.0
        return self.cfg.beta * warm

    def _objective(self, inp: Tensor, target: Tensor, y: Tensor | None, update: bool
                   ) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss of one (binarized) batch; `update`: advance the control variates' averages."""
        if self.cfg.latent != "gaussian":
            return self._discrete_objective(inp, target, update)
        y1h = self._onehot(y, len(inp))
        if self.cfg.iwae_k > 1:
            bound = iwae_bound(self._log_weights(inp, target, y1h, self.cfg.iwae_k))
            loss = -bound.mean()
            return loss, {"iwae_nats": loss.detach()}
        if self.cfg.posterior == "diagonal" and self.enc2 is None:
            mu, logvar = self._posterior(inp, y1h)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            recon = -self._log_px_z(target, self._decode(z, y1h))
            pmu, plogvar = self._prior(y1h, len(inp))
            kl = gaussian_kl(mu, logvar, pmu, plogvar)
        elif self.cfg.posterior == "full" and self.enc2 is None:
            params = self._encoder_out(inp, y1h)
            z, _ = posteriors.sample("full", params, 1, self.cfg.latent_dim)
            recon = -self._log_px_z(target, self._decode(z[0], y1h))
            kl = posteriors.full_gaussian_kl(params, *self._prior(y1h, len(inp)))
        else:  # flows and a second layer have no closed-form KL: its one-sample Monte-Carlo estimate
            z, log_pz, log_q = self._latents(self._encoder_out(inp, y1h), y1h, 1)
            recon = -self._log_px_z(target, self._decode(z[0], y1h))
            kl = (log_q - log_pz)[0]
        beta = self._beta()
        loss = (recon + beta * kl).mean()
        return loss, {"recon_nats": recon.mean().detach(), "kl_nats": kl.mean().detach(),
                      "neg_elbo_nats": (recon + kl).mean().detach(), "beta": torch.tensor(beta)}

    def _discrete_objective(self, inp: Tensor, target: Tensor, update: bool) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        logits = self._logits(self._encoder_out(inp, None))
        beta = self._beta()
        if cfg.estimator.startswith("gumbel"):
            # The relaxed sample goes through the decoder; the KL is the exact one of the discrete q (Jang et al.).
            tau = discrete.temperature(self.global_step, cfg.temperature, cfg.temperature_min, cfg.temperature_decay)
            relax = discrete.binary_concrete if cfg.latent == "bernoulli" else discrete.gumbel_softmax
            z = relax(logits, tau, hard=cfg.estimator == "gumbel_st")
            recon = -self._log_px_z(target, self._decode(z, None))
            kl = discrete.kl_to_uniform(logits, cfg.latent)
            loss = (recon + beta * kl).mean()
            return loss, {"recon_nats": recon.mean().detach(), "kl_nats": kl.mean().detach(),
                          "relaxed_neg_elbo_nats": (recon + kl).mean().detach(), "temperature": torch.tensor(tau)}
        # Score function: f = log p(x|z) + beta (log p(z) - log q(z|x)) at an exact sample z.
        z, log_q = discrete.sample_latent(logits, cfg.latent)
        log_px = self._log_px_z(target, self._decode(z, None))
        log_prior = discrete.uniform_log_prior(cfg.latent, cfg.latent_dim, cfg.categories)
        f = log_px + beta * (log_prior - log_q)
        logs = {"recon_nats": -log_px.mean().detach(), "kl_nats": (log_q - log_prior).mean().detach()}
        baseline = self.baseline(inp).squeeze(-1) if self.baseline is not None else torch.zeros_like(f)
        signal = f.detach() if self.control is None else self.control(f, baseline.detach(), update=update)
        if self.control is not None:
            logs["signal_sd"] = self.control.var.sqrt()  # nvil divides the learning signal by max(1, this)
        surrogate = discrete.score_function_surrogate(f, log_q, signal)
        extra = -(surrogate - surrogate.detach()).mean()  # value 0, gradient: the estimator's
        if self.baseline is not None:
            # b(x) regresses the centred learning signal (Mnih & Gregor 2014, section 3.2).
            mse = ((f.detach() - self.control.mean - baseline) ** 2).mean()
            extra = extra + mse - mse.detach()
            logs["baseline_mse"] = mse.detach()
        neg_elbo = -(log_px + log_prior - log_q).mean().detach()
        logs["neg_elbo_nats"] = neg_elbo
        return -f.mean().detach() + extra, logs

    def encoder_gradient_variance(self, inp: Tensor, target: Tensor, y: Tensor | None = None) -> Tensor:
        """Total variance (trace of the covariance) of the encoder's gradient of the training loss over
        `grad_var_samples` latent draws for this one batch: the estimator's noise, data held fixed."""
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        grads = []
        for _ in range(self.cfg.grad_var_samples):
            loss, _ = self._objective(inp, target, y, update=False)
            g = torch.autograd.grad(loss, params, allow_unused=True)
            grads.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten()
                                    for gi, p in zip(g, params)]))
        return torch.stack(grads).var(0).sum().detach()

    def nll(self, x: Tensor, y: Tensor | None = None, k: int | None = None, chunk: int = 100) -> Tensor:
        """Negative ELBO (k=1, the default) or negative IWAE-k bound (k>1) of the discrete data, nats per example."""
        k = 1 if k is None else k
        if k == 1:
            return -self.log_weights(x, y, 1)[0]
        parts = [self.log_weights(x, y, min(chunk, k - i)) for i in range(0, k, chunk)]
        return -iwae_bound(torch.cat(parts, 0))

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        """Decoder means for z from the prior (as is conventional for VAE samples), uint8 images."""
        cfg = self.cfg
        if cfg.conditional and y is None:
            y = torch.arange(n, device=self.device) % self.data_spec.num_classes
        y1h = self._onehot(y, n)
        if cfg.latent != "gaussian":  # the uniform prior
            shape = (n, cfg.latent_dim) if cfg.latent == "bernoulli" else (n, cfg.latent_dim, cfg.categories)
            z, _ = discrete.sample_latent(torch.zeros(shape, device=self.device), cfg.latent)
            return self._mean_image(self._decode(z, None))
        if self.dec2 is not None:  # z2 ~ N(0, I), z1 ~ p(z1 | z2)
            mu1, logvar1 = self.dec2(torch.randn(n, cfg.latent2_dim, device=self.device)).chunk(2, -1)
            return self._mean_image(self._decode(mu1 + torch.randn_like(mu1) * (0.5 * logvar1).exp(), None))
        pmu, plogvar = self._prior(y1h, n)
        eps = torch.randn(n, cfg.latent_dim, device=self.device)
        z = pmu + eps * torch.exp(0.5 * torch.as_tensor(plogvar, device=self.device))
        return self._mean_image(self._decode(z, y1h))

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Posterior means E[z|x] (flows: of the base Gaussian; discrete: the probabilities q(z=1|x) or
        q(z=j|x)). The encoder is label-free unless the model is conditional."""
        inp, _ = self._targets(x, train=False)
        if self.cfg.latent == "bernoulli":
            return torch.sigmoid(self._encoder_out(inp, None))
        if self.cfg.latent == "categorical":
            return self._logits(self._encoder_out(inp, None)).softmax(-1).flatten(1)
        return self._posterior(inp, self._onehot(y, len(x)))[0]

    @torch.no_grad()
    def encode_sample(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """One draw z = mu + sigma * eps of the Gaussian whose mean `encode` returns (for flow and full
        posteriors, their base Gaussian): M1+M2 trains on such draws (Kingma et al. 2014's code)."""
        if self.cfg.latent != "gaussian":
            raise ConfigError(f"encode_sample draws Gaussian latents, and this VAE has model.latent={self.cfg.latent}: "
                              "use one trained with model.latent=gaussian")
        inp, _ = self._targets(x, train=False)
        mu, logvar = self._posterior(inp, self._onehot(y, len(x)))
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp()

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        inp, _ = self._targets(x, train=False)
        y1h = self._onehot(y, len(x))
        if self.cfg.latent != "gaussian":  # decode the most probable latent
            logits = self._logits(self._encoder_out(inp, None))
            mode = ((logits > 0).float() if self.cfg.latent == "bernoulli"
                    else F.one_hot(logits.argmax(-1), self.cfg.categories).float())
            return self._mean_image(self._decode(mode, None))
        return self._mean_image(self._decode(self._posterior(inp, y1h)[0], y1h))

    @property
    def num_labels(self) -> int:
        """Classes the model is conditioned on (0: unconditional)."""
        return self.data_spec.num_classes if self.cfg.conditional else 0

    @torch.no_grad()
    def decode_latent(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """uint8 decoder-mean images of latents z [B, latent_dim] (M1+M2 decodes its z1 with this)."""
        return self._mean_image(self._decode(z, self._onehot(y, len(z))))

    @torch.no_grad()
    def complete(self, x: Tensor, observed: Tensor, y: Tensor | None = None) -> Tensor:
        """x (uint8) completed where `observed` (broadcast to x's shape) is False by `complete_steps`
        rounds of z ~ q(z | x), x ~ p(x | z) with the observed pixels clamped (Rezende et al. 2014).
        Bernoulli models draw binary pixels; discretized ones take the decoder mean (its per-pixel
        noise is not drawn)."""
        x, m = x.to(self.device), observed.to(self.device).expand_as(x)
        y1h = self._onehot(None if y is None else y.to(self.device), len(x))
        start, _ = self._targets(x, train=False)

        def encode(v: Tensor) -> Tensor:
            mu, logvar = self._posterior(v, y1h)
            return mu + torch.randn_like(mu) * (0.5 * logvar).exp()

        def decode(z: Tensor) -> Tensor:
            out = self._decode(z, y1h)
            if self.cfg.likelihood == "bernoulli":
                return torch.bernoulli(torch.sigmoid(out[:, 0]))
            return self._mean_image(out).float() / 255

        done = complete_latent(encode, decode, start, m, self.cfg.complete_steps)
        return paste(x, (done * 255).round().clamp(0, 255).to(torch.uint8), m)
