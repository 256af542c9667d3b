"""Linear probes on frozen features: a grid of weight decays trained at once, in torch (CPU or GPU).

Protocol (docs/evaluation.md, "Linear probe"):
  1. Features are standardized with the mean and standard deviation of the probe's training set.
  2. One multinomial logistic-regression head per weight decay in the grid is trained jointly (one
     pass over the frozen features feeds every head): mean cross-entropy + wd * ||W||^2, Adam,
     cosine-decayed learning rate, a fixed number of steps.
  3. The weight decay is chosen on a stratified validation part of the training set, the chosen
     head is refit on the whole training set, and its accuracy on the test split is reported.
  4. Steps 2-3 repeat for each seed (which draws the validation part, the initialization, the
     mini-batch order and, for the semi-supervised probe, which examples carry labels);
     reported: mean and standard deviation of test accuracy over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class ProbeSettings:
    """Hyperparameters of every linear probe (reported with each result)."""

    weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS  # L2 penalty grid, one head each
    steps: int = 300  # optimizer steps per fit
    batch_size: int = 1024  # examples per step (the whole set when smaller)
    lr: float = 1e-2  # Adam peak learning rate, cosine-decayed to 0
    val_fraction: float = 0.1  # part of the training set that selects the weight decay
    seeds: tuple[int, ...] = (0, 1, 2)


@dataclass
class ProbeResult:
    accuracy_mean: float
    accuracy_std: float
    accuracies: list[float]
    weight_decays: list[float]  # the chosen one per seed
    num_train: int
    num_test: int
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def standardize(train: Tensor, *others: Tensor, eps: float = 1e-6) -> list[Tensor]:
    """Centre and scale every set by the training set's per-feature mean and std."""
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(eps)
    return [(t - mean) / std for t in (train, *others)]


def fit_heads(
    x: Tensor, y: Tensor, num_classes: int, weight_decays: Sequence[float], settings: ProbeSettings, seed: int
) -> tuple[Tensor, Tensor]:
    """Train one linear head per weight decay on (x, y) at once; returns W [G, D, C], b [G, C]."""
    with torch.enable_grad(), _few_threads_if_small(x, len(weight_decays) * num_classes):
        # (enable_grad: callers such as the eval runner may be under no_grad)
        return _fit_heads(x, y, num_classes, weight_decays, settings, seed)


@contextmanager
def _few_threads_if_small(x: Tensor, outputs: int) -> Iterator[None]:
    """One intra-op thread for small CPU problems, restored afterwards.

    A probe step on a few hundred examples is microseconds of arithmetic; with several threads on a
    busy machine each op waits for descheduled workers, measured 20x slower than one thread.
    """
    small = x.device.type == "cpu" and min(x.shape[0], 1024) * x.shape[1] * outputs < 2**24
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


def _fit_heads(
    x: Tensor, y: Tensor, num_classes: int, weight_decays: Sequence[float], settings: ProbeSettings, seed: int
) -> tuple[Tensor, Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)  # initialization
    order_gen = torch.Generator(device="cpu").manual_seed(seed + 1)  # mini-batch order
    g, d = len(weight_decays), x.shape[1]
    # All heads side by side in one [D, G*C] matrix: one matmul per step feeds every head. Every head
    # starts from the same initialization and sees the same batches, so a grid trains each head
    # exactly as it would be trained alone (Adam is elementwise).
    w0 = torch.randn(d, 1, num_classes, generator=gen).expand(d, g, num_classes) * 0.01
    w = w0.reshape(d, g * num_classes).to(x.device).requires_grad_(True)
    b = torch.zeros(g, num_classes, device=x.device, requires_grad=True)
    wd = torch.tensor(list(weight_decays), dtype=x.dtype, device=x.device)
    opt = torch.optim.Adam([w, b], lr=settings.lr)
    n = x.shape[0]
    bs = min(settings.batch_size, n)
    order = torch.randperm(n, generator=order_gen).to(x.device)
    pos = 0
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = settings.lr * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=order_gen).to(x.device), 0
        idx = order[pos : pos + bs]
        pos += bs
        logits = (x[idx] @ w).view(-1, g, num_classes) + b
        ce = F.cross_entropy(logits.reshape(-1, num_classes), y[idx].repeat_interleave(g), reduction="none")
        # Heads are independent, so summing their losses trains each one as if alone.
        penalty = (wd * w.view(d, g, num_classes).pow(2).sum((0, 2))).sum()
        loss = ce.view(-1, g).mean(0).sum() + penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return w.detach().view(d, g, num_classes).permute(1, 0, 2), b.detach()


@torch.no_grad()
def head_accuracies(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Accuracy of each head [G] on (x, y)."""
    pred = (torch.einsum("nd,gdc->gnc", x, w) + b[:, None]).argmax(-1)
    return (pred == y[None]).float().mean(1)


def stratified_split(y: Tensor, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices (fit, val) with about `fraction` of every class in val (at least one, and one left to fit)."""
    fit, val = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        val.append(idx[:k])
        fit.append(idx[k:])
    return torch.cat(fit), torch.cat(val)


def select_and_fit(
    x: Tensor, y: Tensor, num_classes: int, settings: ProbeSettings, seed: int
) -> tuple[float, Tensor, Tensor]:
    """Choose the weight decay on a validation part, then refit it on all of (x, y)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    counts = torch.bincount(y.cpu(), minlength=num_classes)
    if len(settings.weight_decays) > 1 and int(counts[counts > 0].min()) >= 2:
        fit, val = stratified_split(y.cpu(), settings.val_fraction, gen)
        fit, val = fit.to(x.device), val.to(x.device)
        w, b = fit_heads(x[fit], y[fit], num_classes, settings.weight_decays, settings, seed)
        best = int(head_accuracies(w, b, x[val], y[val]).argmax())
        wd = settings.weight_decays[best]
    else:  # one label per class leaves nothing to validate on: the middle of the grid
        wd = settings.weight_decays[len(settings.weight_decays) // 2]
    w, b = fit_heads(x, y, num_classes, [wd], settings, seed)
    return wd, w, b


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    settings: ProbeSettings | None = None,
    labels_per_class: int | None = None,
) -> ProbeResult:
    """Test accuracy of a linear probe on frozen features (mean and std over seeds).

    With `labels_per_class`, each seed draws that many labelled training examples per class and
    the probe sees only those (the semi-supervised protocol).
    """
    settings = settings or ProbeSettings()
    accs, wds = [], []
    n_train = len(train_y)
    for seed in settings.seeds:
        x, y = train_x.float(), train_y
        if labels_per_class is not None:
            idx = labelled_subset(y, labels_per_class, seed)
            x, y = x[idx.to(x.device)], y[idx.to(y.device)]
        n_train = len(y)
        xs, xt = standardize(x, test_x.float())
        wd, w, b = select_and_fit(xs, y, num_classes, settings, seed)
        accs.append(float(head_accuracies(w, b, xt, test_y)[0]))
        wds.append(wd)
    t = torch.tensor(accs, dtype=torch.float64)
    return ProbeResult(float(t.mean()), float(t.std(unbiased=False)), accs, wds, n_train, len(test_y), asdict(settings))


def labelled_subset(y: Tensor, per_class: int, seed: int) -> Tensor:
    """Indices of `per_class` examples of every class, drawn with `seed` (all of a class if it has fewer)."""
    gen = torch.Generator().manual_seed(20_000 + seed)
    yc = y.cpu()
    picks = []
    for c in torch.unique(yc):
        if c < 0:  # unlabelled
            continue
        idx = torch.nonzero(yc == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.cat(picks)
