"""EBM: the maximum-likelihood gradient with Langevin negatives against the closed form, the replay buffer,
the divergence guard (one-line error, last checkpoint intact), and resuming with the same replay buffer
(bitwise, 1 and 2 CPU processes)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from scalegen.config import load_config
from scalegen.config.schema import OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.errors import UserError
from scalegen.families.ebm import EBM, EBMConfig
from scalegen.objectives.ebm import buffer_starts, ml_loss
from scalegen.runtime import load_model, read_checkpoint
from scalegen.runtime.train import train
from scalegen.samplers.langevin import sgld

REPO = Path(__file__).resolve().parents[2]


def test_ml_gradient_with_langevin_negatives_matches_the_exact_gradient() -> None:
    """E_theta(x) = theta x^2 / 2 (a Gaussian of precision theta, log Z = log sqrt(2 pi / theta)). The
    exact gradient of -mean log p(x+) is mean(x+^2)/2 - 1/(2 theta); the surrogate E(x+) - E(x-) with
    SGLD negatives must give it within 4 standard errors (+ 0.01 for the step size's O(a) bias)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    energy = lambda x: 0.5 * theta * x.pow(2).sum(1)  # noqa: E731
    n = 20_000
    x_pos = torch.randn(n, 1, generator=g, dtype=torch.float64)  # data: precision 1
    x_neg = sgld(energy, torch.randn(n, 1, generator=g, dtype=torch.float64), steps=500, step_size=0.01,
                 generator=g)
    loss, _ = ml_loss(energy(x_pos), energy(x_neg))
    (grad,) = torch.autograd.grad(loss, theta)
    exact = 0.5 * x_pos.pow(2).mean() - 1 / (2 * theta.detach())
    se = 0.5 * x_neg.pow(2).std() / math.sqrt(n)
    assert abs(grad.item() - exact.item()) < 4 * se.item() + 0.01, (grad.item(), exact.item(), se.item())


def test_buffer_starts_reinitialize_five_percent() -> None:
    torch.manual_seed(0)
    buffer = torch.full((1000, 1, 2, 2), 5.0)  # outside [-1, 1], so fresh noise is recognizable
    starts, idx = buffer_starts(buffer, 20_000, 0.05)
    fresh = (starts.flatten(1).abs() <= 1).all(1).float()
    p, n = 0.05, len(fresh)
    assert abs(fresh.mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(starts[fresh == 0], buffer[idx[fresh == 0]])  # the others are copies of their entries


def test_training_step_updates_only_drawn_buffer_entries_and_negatives_carry_no_graph() -> None:
    torch.manual_seed(0)
    cfg = EBMConfig(widths=[8], sgld_steps=3, buffer_size=50, reinit_prob=0.0)
    model = EBM(cfg, OptimConfig(), DataSpec(shape=(1, 8, 8)))
    before = model.replay_buffer().clone()
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    loss, logs = model.loss({"x": x})
    loss.backward()
    changed = (model.buffer != before).flatten(1).any(1)
    assert 1 <= int(changed.sum()) <= 5  # the (up to 5 distinct) drawn entries, nothing else
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert not model.buffer.requires_grad
    assert set(logs) == {"energy_data", "energy_samples", "contrastive"}
    samples = model.sample(4)
    assert samples.shape == (4, 1, 8, 8) and samples.dtype == torch.uint8


def test_data_noise_perturbs_training_examples_only() -> None:
    torch.manual_seed(0)
    model = EBM(EBMConfig(widths=[8], data_noise=0.03), OptimConfig(), DataSpec(shape=(1, 8, 8)))
    x = torch.randint(0, 256, (2000, 1, 8, 8), dtype=torch.uint8)
    clean = model.eval().positives(x)
    assert clean.min() >= -1 and clean.max() <= 1 and torch.equal(clean, model.positives(x))
    noise = model.train().positives(x) - clean
    assert abs(noise.mean().item()) < 4 * 0.03 / math.sqrt(noise.numel())  # N(0, 0.03^2), 128,000 draws
    assert noise.std().item() == pytest.approx(0.03, rel=0.02)


def test_spectral_norm_bounds_each_layer() -> None:
    torch.manual_seed(0)
    model = EBM(EBMConfig(widths=[8, 8], spectral_norm=True), OptimConfig(), DataSpec(shape=(1, 8, 8)))
    model.train()
    for _ in range(30):  # power iterations converge while the weights stay put
        model.energy(torch.rand(2, 1, 8, 8) * 2 - 1)
    head = model.net.head.weight
    assert torch.linalg.matrix_norm(head, ord=2).item() == pytest.approx(1.0, abs=0.05)


def test_divergence_guard_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path: Path, train_recipe) -> None:
    """lr 0.1 without the energy regularizer blows the energies past 1e4 within an epoch of the tiny recipe."""
    with pytest.raises(UserError) as err:
        train_recipe("ebm/tiny", tmp_path / "run", "trainer.val_check_interval=3", "optim.lr=0.1",
                     "model.energy_reg=0")
    message = str(err.value)
    assert "\n" not in message and "diverged at step" in message
    assert "model.max_energy" in message and "optim.lr" in message and "model.energy_reg" in message
    step = int(message.split("diverged at step ")[1].split(":")[0])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] < step
    model, _ = load_model(last)
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        assert model.energy(x).abs().max().item() < model.cfg.max_energy  # the good weights


class _StopStep(L.Callback):
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.step = trainer.global_step


@pytest.mark.parametrize("every, checkpoint_every", [(2, 1000), (1000, 3)])
def test_guard_stops_within_guard_every_steps_or_at_the_next_checkpoint(tmp_path: Path, every: int,
                                                                        checkpoint_every: int) -> None:
    """The steps only record a breach on the device; the host reads it every `guard_every` steps and before
    each checkpoint. Read every 2 steps (no checkpoint on the way): the run stops at most 2 steps after the
    breach. Read every 1000 steps, checkpoints every 3: the first checkpoint after the breach is refused
    (never written), so last.ckpt predates the breach and holds in-limit energies."""
    cfg = load_config("ebm/tiny", [f"run.dir={tmp_path}", "run.name=run", "trainer.progress_bar=false",
                                   "logging.wandb=false", "optim.lr=0.1", "model.energy_reg=0",
                                   f"model.guard_every={every}", f"trainer.val_check_interval={checkpoint_every}"])
    stop = _StopStep()
    with pytest.raises(UserError, match="diverged at step") as err:
        train(cfg, callbacks=[stop])
    step = int(str(err.value).split("diverged at step ")[1].split(":")[0])
    assert step <= stop.step <= step + min(every, checkpoint_every), (step, stop.step)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    if last.exists():
        assert read_checkpoint(last)["global_step"] <= step  # the weights before the breaching step
        model, _ = load_model(last)
        with torch.no_grad():
            assert model.energy(torch.rand(16, 1, 8, 8) * 2 - 1).abs().max().item() < model.cfg.max_energy
    else:
        assert checkpoint_every > step  # no checkpoint was due before the breach


def _buffers(ckpt: Path) -> list[torch.Tensor]:
    return [s["buffer"] for s in read_checkpoint(ckpt)["rank_states"]]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = read_checkpoint(a)["state_dict"], read_checkpoint(b)["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(x, y) for x, y in zip(_buffers(a), _buffers(b), strict=True))


def test_resumed_run_continues_with_the_same_replay_buffer(tmp_path: Path, train_recipe) -> None:
    """Two epochs straight vs. one epoch, then the same command resumed to two: bitwise equal weights and
    replay buffer (saved per rank in the checkpoint)."""
    common = ("trainer.deterministic=true",)
    straight = train_recipe("ebm/tiny", tmp_path / "straight", "trainer.max_epochs=2", *common)
    train_recipe("ebm/tiny", tmp_path / "resumed", "trainer.max_epochs=1", *common)
    first = _buffers(tmp_path / "resumed" / "checkpoints" / "last.ckpt")[0]
    resumed = train_recipe("ebm/tiny", tmp_path / "resumed", "trainer.max_epochs=2",
                           "trainer.resume_allow_changes=[trainer.max_epochs]", *common)
    assert not torch.equal(first, _buffers(resumed / "checkpoints" / "last.ckpt")[0])  # it trained on
    _assert_same_run(straight / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt")


def _ddp(tmp_path: Path, name: str, epochs: int, *extra: str, returncode: int = 0) -> str:
    cmd = [sys.executable, "-m", "scalegen", "train", "ebm/tiny", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.strategy=ddp", f"trainer.max_epochs={epochs}", "trainer.deterministic=true",
           "trainer.progress_bar=false", "logging.wandb=false", f"run.dir={tmp_path}", f"run.name={name}", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == returncode, out.stderr[-3000:]
    return out.stderr


@pytest.mark.slow
def test_ddp_divergence_stops_every_rank_with_the_one_line_error(tmp_path: Path) -> None:
    """2 CPU processes (gloo), made to diverge: both ranks read the guard at the same steps (one all-gather),
    so the job ends with the one-line error (exit 2) instead of one rank waiting for the other."""
    err = _ddp(tmp_path, "diverge", 1, "optim.lr=0.1", "model.energy_reg=0", "trainer.val_check_interval=3",
               returncode=2)
    assert "ebm training diverged at step" in err and "model.max_energy" in err


@pytest.mark.slow
def test_ddp_resume_gives_each_rank_its_own_buffer_bitwise(tmp_path: Path) -> None:
    """2 CPU processes (gloo): a run stopped after one epoch and resumed ends bitwise equal to a straight
    run, weights and both ranks' replay buffers (which differ from each other)."""
    _ddp(tmp_path, "straight", 2)
    _ddp(tmp_path, "resumed", 1)
    _ddp(tmp_path, "resumed", 2, "trainer.resume_allow_changes=[trainer.max_epochs]")
    a, b = tmp_path / "straight" / "checkpoints" / "last.ckpt", tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    buffers = _buffers(a)
    assert len(buffers) == 2 and not torch.equal(buffers[0], buffers[1])
    _assert_same_run(a, b)


def test_buffer_is_pooled_and_redealt_at_another_world_size() -> None:
    model = EBM(EBMConfig(widths=[8], buffer_size=6), OptimConfig(), DataSpec(shape=(1, 2, 2)))
    a, b = torch.full((6, 1, 2, 2), 0.25), torch.full((6, 1, 2, 2), -0.5)
    model.load_rank_state({0: {"buffer": a}, 1: {"buffer": b}}, saved_world_size=2, world_size=1)
    assert torch.equal(model.buffer, a)  # rank 0 of 1 takes the first buffer_size pooled chains
    model.load_rank_state({"buffer": b}, saved_world_size=1, world_size=1)
    assert torch.equal(model.buffer, b)
    assert model.rank_state()["buffer"].shape == (6, 1, 2, 2)
