"""RBM mathematics against exact enumeration (log Z, log-likelihood gradient) and the family trained for real.

Tiny RBMs (10 visible x 8 hidden) have 2^8 hidden states, so log Z and its gradient are exact by
enumeration (`exact_log_z`, checked here against a sum over the 2^10 visible states as well)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from scalegen.config.schema import OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.families.rbm import RBM, RBMConfig
from scalegen.nets.rbm import RBMParams
from scalegen.objectives.rbm import ais_log_z, cd_loss, exact_log_z, free_energy, gibbs, parallel_tempering
from scalegen.runtime import load_model


def tiny_rbm(seed: int, weight_std: float, visible: int = 10, hidden: int = 8) -> RBMParams:
    torch.manual_seed(seed)
    rbm = RBMParams(visible, hidden, weight_std)
    with torch.no_grad():
        rbm.b.normal_(0, 0.5)
        rbm.c.normal_(0, 0.5)
    return rbm


def all_binary(n: int) -> torch.Tensor:
    codes = torch.arange(2**n)
    return ((codes[:, None] >> torch.arange(n)) & 1).float()


def test_exact_log_z_matches_the_sum_over_visible_states() -> None:
    rbm = tiny_rbm(0, 0.5)
    brute = torch.logsumexp(-free_energy(rbm, all_binary(10)).double(), 0)
    assert exact_log_z(rbm).item() == pytest.approx(brute.item(), abs=1e-4)


def test_gaussian_free_energy_integrates_to_the_exact_log_z() -> None:
    """Gaussian-Bernoulli, 1 visible x 3 hidden: log of the integral of exp(-F(v)) on a fine grid."""
    rbm = tiny_rbm(1, 0.5, visible=1, hidden=3)
    v = torch.linspace(-12, 12, 200_001, dtype=torch.float64)[:, None]
    dv = float(v[1] - v[0])
    integral = torch.logsumexp(-free_energy(rbm.double(), v, gaussian=True), 0) + math.log(dv)
    assert exact_log_z(rbm, gaussian=True).item() == pytest.approx(integral.item(), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gaussian", [False, True])
def test_ais_log_z_within_005_nats_of_enumeration(gaussian: bool, dtype: torch.dtype) -> None:
    rbm = tiny_rbm(2, 0.5 if not gaussian else 0.25)
    exact = exact_log_z(rbm, gaussian).item()
    result = ais_log_z(rbm, torch.zeros(10), temperatures=1000, runs=200, gaussian=gaussian,
                       generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert abs(result.log_z - exact) < 0.05, (result.log_z, exact)
    # The reported standard error is of the right size: the error is within 4 of them (and they are small).
    assert abs(result.log_z - exact) < 4 * result.stderr + 1e-3 and result.stderr < 0.02, result


def _grad(rbm: RBMParams, loss: torch.Tensor) -> torch.Tensor:
    rbm.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in rbm.parameters()])


def test_cd_gradient_correlates_with_the_exact_log_likelihood_gradient() -> None:
    """Gradients w.r.t. (W, b, c) of -mean log p(data): exact by autograd through enumerated log Z, and
    the CD-k estimate (200 chains per data vector). Thresholds: CD-1 > 0.95 and CD-25 > 0.99 correlation,
    where the data term alone (no negative phase) correlates only ~0.1, so the negatives carry the match."""
    rbm = tiny_rbm(0, 1.0)
    protos = (torch.rand(4, 10) < 0.5).float()
    data = protos[torch.randint(0, 4, (64,))]
    data = torch.where(torch.rand_like(data) < 0.1, 1 - data, data)
    exact = _grad(rbm, free_energy(rbm, data).mean() + exact_log_z(rbm))
    data_term = _grad(rbm, free_energy(rbm, data).mean())
    corr = lambda g: torch.corrcoef(torch.stack([exact, g]))[0, 1].item()  # noqa: E731
    assert corr(data_term) < 0.5
    v = data.repeat(200, 1)
    for k, threshold in ((1, 0.95), (25, 0.99)):
        negatives, _ = gibbs(rbm, v, k)
        assert corr(_grad(rbm, cd_loss(rbm, v, negatives))) > threshold, k


def test_persistent_chains_are_rank_state_and_continue() -> None:
    torch.manual_seed(0)
    model = RBM(RBMConfig(hidden=8, persistent=True, pcd_chains=5, cd_k=1), OptimConfig(), DataSpec(shape=(1, 4, 4)))
    x = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    model.loss({"x": x})
    state = model.rank_state()
    assert state["chains"].shape == (5, 16)
    other = RBM(model.cfg, OptimConfig(), model.data_spec)
    other.load_state_dict(model.state_dict())
    other.load_rank_state(state, 1, 1)
    torch.manual_seed(1)
    model.loss({"x": x})
    torch.manual_seed(1)
    other.loss({"x": x})
    assert torch.equal(model.chains, other.chains)  # the restored chains continue exactly


def test_family_nll_is_free_energy_plus_ais_log_z_and_normalizes() -> None:
    """On a 3x3 binary image space the family's exp(-nll) sums to ~1 over all 512 images."""
    torch.manual_seed(0)
    model = RBM(RBMConfig(hidden=6, ais_temperatures=1000, ais_runs=200), OptimConfig(), DataSpec(shape=(1, 3, 3)))
    with torch.no_grad():
        model.rbm.W.normal_(0, 0.7)
        model.data_sum.fill_(30.0)
        model.data_count.fill_(100.0)
    images = (all_binary(9) * 255).to(torch.uint8).view(-1, 1, 3, 3)
    total = torch.logsumexp(-model.nll(images).double(), 0).item()
    assert abs(total) < 0.05, total
    est = model.log_z_estimate()
    assert est["log_z"] == pytest.approx(exact_log_z(model.rbm).item(), abs=0.05) and est["ais_runs"] == 200


def test_tiny_recipe_learns_digits(tmp_path: Path, train_recipe) -> None:
    """Trained on the 8x8 digits, the AIS test NLL drops well below a fresh RBM's (64 ln 2 = 44 nats)."""
    from scalegen.config import load_config
    from scalegen.data import build_datamodule

    run = train_recipe("rbm/tiny", tmp_path / "rbm")
    model, _ = load_model(run / "checkpoints" / "last.ckpt")
    dm = build_datamodule(load_config("rbm/tiny").data)
    dm.setup("test")
    x = torch.cat([b["x"] for b in dm.test_dataloader()])
    nll = model.nll(x).mean().item()
    assert nll < 64 * math.log(2) - 10, nll
    assert model.encode(x[:4]).shape == (4, model.cfg.hidden)
    assert model.sample(3).shape == (3, 1, 8, 8)


def test_parallel_tempering_samples_the_exact_distribution() -> None:
    """A strongly coupled 6 x 4 RBM: the beta = 1 chains of parallel tempering match p(v) by enumeration
    (total variation < 0.05 with 4,000 chains: the multinomial noise over 64 states is ~0.03)."""
    torch.manual_seed(0)
    rbm = tiny_rbm(3, 2.0, visible=6, hidden=4)
    states = all_binary(6)
    exact = torch.softmax(-free_energy(rbm, states).double(), 0)
    betas = torch.linspace(1.0, 0.2, 4)
    chains = torch.bernoulli(torch.full((4, 4000, 6), 0.5))
    for _ in range(100):
        chains = parallel_tempering(rbm, chains, betas, steps=1)
    codes = (chains[0] * 2 ** torch.arange(6)).sum(1).long()
    empirical = torch.bincount(codes, minlength=64).double() / len(codes)
    assert 0.5 * (empirical - exact).abs().sum().item() < 0.05


def test_family_with_parallel_tempering_trains_a_step() -> None:
    torch.manual_seed(0)
    cfg = RBMConfig(hidden=8, persistent=True, pcd_chains=5, pt_temperatures=3)
    model = RBM(cfg, OptimConfig(), DataSpec(shape=(1, 4, 4)))
    loss, _ = model.loss({"x": torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)})
    loss.backward()
    assert model.chains.shape == (3, 5, 16) and torch.isfinite(loss)
