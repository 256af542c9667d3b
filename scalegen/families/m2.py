"""Semi-supervised VAEs (Kingma, Rezende, Mohamed & Welling 2014): M2, and M1+M2 over a frozen M1.

M2's generative model is p(y) p(z) p(x | y, z) with p(y) uniform over C classes and p(z) = N(0, I); the
inference model is q(z | x, y) (diagonal Gaussian) and q(y | x) (a classifier). The bounds (2014 Eqs. 6-7):

    labelled    -L(x, y) = E_q(z|x,y)[ -log p(x|y,z) - log p(y) ] + KL(q(z|x,y) || p(z))
    unlabelled  -U(x)    = sum_y q(y|x) (-L(x, y)) - H(q(y|x))

The objective (Eq. 9) adds alpha E_labelled[-log q(y|x)] to the sum of the bounds over the data set.
Per example (divided by the N training examples) that is

    loss = mean over the batch of [-L(x, y) if x is labelled, else -U(x)] + (alpha / N) mean_l[-log q(y|x)]

with `alpha_factor` = alpha / N (the paper: alpha = 0.1 N). The classification term is averaged over a
labelled batch drawn beside every training batch (`labelled_stream`: `x_labelled`, `y_labelled`, the
labelled subset chosen by `data.labels_per_class`); a batch without it (every label known) uses the
main batch's labelled examples.

M1+M2 (the `m1m2` family): the same model over the latents z1 of a frozen M1 VAE named by `model.stage1`
(draws from q(z1|x) in training, the means E[z1|x] otherwise), with a Gaussian p(z1 | y, z2). It
classifies and samples (decoding z1 with M1's decoder); its bound is on the latents, not on the pixels, so
it reports no bits/dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from scalegen.config.schema import ModelConfig, OptimConfig, choice, ranged
from scalegen.dataspec import DataSpec
from scalegen.errors import ConfigError, UserError
from scalegen.families.base import GenerativeModel
from scalegen.nets.mlp import MLP
from scalegen.objectives.elbo import LOG_2PI, bernoulli_log_prob, gaussian_kl, log_normal
from scalegen.registry import register_family


@dataclass
class M2Config(ModelConfig):
    family: str = "m2"
    stage1: str | None = None  # m1m2 only: the frozen M1 (a vae checkpoint or run folder)
    hidden: list[int] = ranged(None, ge=1, default_factory=lambda: [500])  # MLP widths of every network
    latent_dim: int = ranged(50, ge=1)  # dimension of z (the paper: 50)
    alpha_factor: float = ranged(0.1, ge=0)  # alpha / N: weight of -log q(y|x) per labelled example (0.1)
    binarize: str = choice("dynamic", "threshold")  # pixels -> {0,1} in training; evaluation thresholds at 1/2
    min_logvar: float = ranged(-8.0, le=0)  # m1m2: floor of log-variance of p(z1 | y, z2)


def logmeanexp(t: Tensor, dim: int) -> Tensor:
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


@register_family("m2", M2Config, "Semi-supervised VAE M2 (Kingma et al. 2014): classify, sample(n, y)")
class M2(GenerativeModel):
    """M2 on binarized images: classifier q(y|x), encoder q(z|x,y), decoder p(x|y,z)."""

    predictions = frozenset({"nll", "sample", "encode", "reconstruct", "classify"})
    data_kinds = frozenset({"image"})
    nll_kind = "elbo"  # nll(x, k=None/1) = -U(x); k > 1: importance-weighted bound, summing over y
    monitor = "val/loss"
    labelled_stream = True

    def __init__(self, cfg: M2Config, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        if cfg.stage1 and type(self) is M2:
            raise ConfigError("model.stage1 is for M1+M2: use model.family=m1m2, or unset model.stage1")
        if data.num_classes < 2:
            raise ConfigError("the m2 family needs a labelled dataset (data spec has fewer than 2 classes)")
        self.num_classes = data.num_classes
        in_dim = self.feature_dim()
        out_dim = in_dim * self.outputs_per_feature()
        self.classifier = MLP(in_dim, cfg.hidden, self.num_classes)
        self.encoder = MLP(in_dim + self.num_classes, cfg.hidden, 2 * cfg.latent_dim)
        self.decoder = MLP(cfg.latent_dim + self.num_classes, list(reversed(cfg.hidden)), out_dim)

    # ---- what the model is over: binarized pixels here, M1 features in m1m2 -------------------
    def feature_dim(self) -> int:
        return self.data_spec.dims

    def outputs_per_feature(self) -> int:
        return 1  # a Bernoulli logit per pixel

    def features(self, x: Tensor, train: bool = False) -> Tensor:
        """The observed variable: x binarized, flattened [B, D]."""
        p = x.flatten(1).float() / 255
        if train and self.cfg.binarize == "dynamic":
            return (torch.rand_like(p) < p).float()
        return (p > 0.5).float()

    def log_px(self, target: Tensor, out: Tensor) -> Tensor:
        """log p(x | y, z) [B] of features [B, D] under the decoder output [B, D * outputs]."""
        return bernoulli_log_prob(target, out)

    def decode_mean(self, out: Tensor) -> Tensor:
        """uint8 images of the decoder's mean."""
        return (torch.sigmoid(out).view(len(out), *self.data_spec.shape) * 255).round().to(torch.uint8)

    # ---- the pieces of the bounds ---------------------------------------------------------------
    def _onehot(self, y: Tensor) -> Tensor:
        # By comparison, not F.one_hot, whose range check reads the labels on the host in every call.
        return (y.unsqueeze(-1) == torch.arange(self.num_classes, device=y.device)).float()

    def log_q_y(self, f: Tensor) -> Tensor:
        """log q(y | x) [B, C]."""
        return F.log_softmax(self.classifier(f), -1)

    def posterior(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(torch.cat([f, self._onehot(y)], 1)).chunk(2, 1)

    def labelled_bound(self, f: Tensor, y: Tensor, eps: Tensor | None = None) -> Tensor:
        """L(x, y) [B]: one reparameterized sample z = mu + sigma eps (eps ~ N(0, I) unless given), the KL
        in closed form."""
        mu, logvar = self.posterior(f, y)
        eps = torch.randn_like(mu) if eps is None else eps
        z = mu + eps * (0.5 * logvar).exp()
        out = self.decoder(torch.cat([z, self._onehot(y)], 1))
        return self.log_px(f, out) - math.log(self.num_classes) - gaussian_kl(mu, logvar)

    def all_label_bounds(self, f: Tensor, eps: Tensor | None = None) -> Tensor:
        """L(x, y) for every class y: [B, C] (one pass over the B*C pairs; eps [B, C, latent_dim] if given)."""
        b, c = len(f), self.num_classes
        ys = torch.arange(c, device=f.device).repeat(b)
        flat_eps = None if eps is None else eps.reshape(b * c, -1)
        return self.labelled_bound(f.repeat_interleave(c, 0), ys, flat_eps).view(b, c)

    def bounds(self, f: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(L(x, y) for every class y [B, C], U(x) = sum_y q(y|x) L(x, y) + H(q(y|x)) [B])."""
        log_q = self.log_q_y(f)
        q = log_q.exp()
        every = self.all_label_bounds(f, eps)
        return every, (q * every).sum(1) - (q * log_q).sum(1)

    def unlabelled_bound(self, f: Tensor, eps: Tensor | None = None) -> Tensor:
        """U(x) [B]."""
        return self.bounds(f, eps)[1]

    # ---- the family contract --------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        f = self.features(batch["x"], train=self.training)
        y = batch.get("y")
        if y is None:
            y = torch.full((len(f),), -1, dtype=torch.long, device=f.device)
        known = y >= 0
        # Every row's L(x, y') for all C labels in one pass: a labelled row takes the entry of its own label
        # (the same one-sample estimate of L(x, y)), an unlabelled row U(x). Splitting the rows instead
        # would read their counts on the host; the price is C - 1 unused decoder passes per labelled row,
        # a small share of a semi-supervised batch.
        every, unlabelled = self.bounds(f)
        bound = torch.where(known, every.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1), unlabelled)
        if "x_labelled" in batch:
            fl, yl = self.features(batch["x_labelled"], train=self.training), batch["y_labelled"]
        else:
            fl, yl = f, y
        logs = {"neg_bound_nats": -bound.mean().detach(), "labelled_in_batch": known.float().mean()}
        loss = -bound.mean()
        if len(yl):
            w = (yl >= 0).float()  # the classification term over the labelled rows only (y = -1 weighted 0)
            ce = F.cross_entropy(self.classifier(fl), yl.clamp(min=0), reduction="none")
            ce = (ce * w).sum() / w.sum().clamp(min=1)
            loss = loss + self.cfg.alpha_factor * ce
            logs["classifier_nats"] = ce.detach()
        return loss, logs

    def nll(self, x: Tensor, y: Tensor | None = None, k: int | None = None, chunk: int = 50) -> Tensor:
        """-U(x) (k None or 1), or with k > 1 the tighter -log sum_y p(y) (1/k) sum_i p(x,z_i|y)/q(z_i|x,y),
        z_i ~ q(z|x,y): both upper bounds on -log p(x) of the binarized data, nats [B]. The label is not used."""
        f = self.features(x)
        if not k or k == 1:
            return -self.unlabelled_bound(f)
        parts = [self._log_weights(f, min(chunk, k - i)) for i in range(0, k, chunk)]
        log_w = torch.cat(parts, 0)  # [k, B, C]
        return -torch.logsumexp(logmeanexp(log_w, 0) - math.log(self.num_classes), 1)

    def _log_weights(self, f: Tensor, k: int) -> Tensor:
        """log p(x|y,z) + log p(z) - log q(z|x,y) for k samples and every y: [k, B, C]."""
        b, c = len(f), self.num_classes
        fr = f.repeat_interleave(c, 0)
        ys = torch.arange(c, device=f.device).repeat(b)
        mu, logvar = self.posterior(fr, ys)
        z = mu + torch.randn(k, *mu.shape, device=mu.device) * (0.5 * logvar).exp()
        out = self.decoder(torch.cat([z.reshape(k * b * c, -1), self._onehot(ys).repeat(k, 1)], 1))
        log_px = self.log_px(fr.repeat(k, 1), out).view(k, b * c)
        return (log_px + log_normal(z, 0.0, 0.0) - log_normal(z, mu, logvar)).view(k, b, c)

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        """log q(y | x) [B, C]."""
        return self.log_q_y(self.features(x))

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None) -> Tensor:
        """Decoder means for z ~ N(0, I) and the labels y (classes 0, 1, 2, ... when None)."""
        if y is None:
            y = torch.arange(n, device=self.device) % self.num_classes
        z = torch.randn(n, self.cfg.latent_dim, device=self.device)
        return self.decode_mean(self.decoder(torch.cat([z, self._onehot(y.to(self.device))], 1)))

    def _style(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(E[z | x, y_hat], y_hat) with y_hat the classifier's label."""
        f = self.features(x)
        y_hat = self.log_q_y(f).argmax(1)
        return self.posterior(f, y_hat)[0], y_hat

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """[E[z | x, y_hat], q(y | x)]: the style and the class posterior, [B, latent_dim + C]."""
        z, _ = self._style(x)
        return torch.cat([z, self.log_q_y(self.features(x)).exp()], 1)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        z, y_hat = self._style(x)
        return self.decode_mean(self.decoder(torch.cat([z, self._onehot(y_hat)], 1)))

    @torch.no_grad()
    def analogies(self, x: Tensor) -> Tensor:
        """The style E[z|x, y_hat] of each image decoded with every label: [B, C] images (2014 Fig. 1)."""
        z, _ = self._style(x)
        b, c = len(z), self.num_classes
        ys = torch.arange(c, device=z.device).repeat(b)
        out = self.decoder(torch.cat([z.repeat_interleave(c, 0), self._onehot(ys)], 1))
        imgs = self.decode_mean(out)
        return imgs.view(b, c, *imgs.shape[1:])

    @torch.no_grad()
    def extra_figures(self, x: Tensor, y: Tensor) -> dict[str, tuple[Tensor, int]]:
        """Eval's analogies figure: each row a test image, then its style decoded with labels 0..C-1."""
        x = x[:10]
        grid = torch.cat([x.unsqueeze(1), self.analogies(x)], 1)
        return {"analogies": (grid.flatten(0, 1), self.num_classes + 1)}


@dataclass
class M1M2Config(M2Config):
    family: str = "m1m2"


@register_family("m1m2", M1M2Config, "M1+M2 (Kingma et al. 2014): M2 over the features of a frozen M1 VAE")
class M1M2(M2):
    """M2 over the latents z1 of a frozen M1 (a vae-family checkpoint named by model.stage1)."""

    predictions = frozenset({"sample", "encode", "classify"})
    # M2's bound here is over M1's latents, not the pixels, and there is no pixel reconstruction: withhold both.
    nll = GenerativeModel.nll
    reconstruct = GenerativeModel.reconstruct

    def feature_dim(self) -> int:
        m1 = self.load_stage1()
        if m1.family_name != "vae" or "encode" not in m1.predictions:
            raise UserError(f"model.stage1 is a {m1.family_name!r} model; M1+M2 needs a vae checkpoint (M1)")
        self.stage1 = m1  # a frozen submodule: saved in this model's checkpoints
        with torch.no_grad():  # encode_sample, which training uses, refuses an M1 without Gaussian latents
            return int(m1.encode_sample(torch.zeros(1, *self.data_spec.shape, dtype=torch.uint8)).shape[1])

    def outputs_per_feature(self) -> int:
        return 2  # mean and log-variance of p(z1 | y, z2)

    def train(self, mode: bool = True) -> M1M2:
        super().train(mode)
        self.stage1.eval()  # frozen
        return self

    def configure_optimizers(self):
        params = [p for n, p in self.named_parameters() if not n.startswith("stage1.")]
        return self.build_optimizer(params, self.total_steps())

    def features(self, x: Tensor, train: bool = False) -> Tensor:
        """z1: a draw from M1's q(z1|x) in training, as the paper's code does (docs/families.md measures it
        against training on the means), its mean otherwise."""
        with torch.no_grad():
            return self.stage1.encode_sample(x) if train else self.stage1.encode(x)

    def log_px(self, target: Tensor, out: Tensor) -> Tensor:
        mean, logvar = out.chunk(2, 1)
        logvar = logvar.clamp(min=self.cfg.min_logvar)
        return (-0.5 * (LOG_2PI + logvar + (target - mean) ** 2 / logvar.exp())).sum(1)

    def decode_mean(self, out: Tensor) -> Tensor:
        """M1's decoder mean image of the mean of p(z1 | y, z2)."""
        return self.stage1.decode_latent(out.chunk(2, 1)[0])
