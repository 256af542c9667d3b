"""EMA: the closed form of the recursion, warm-up and every-k updates, and the callback under DDP
(gloo, 2 processes: identical averages on both ranks, validation with the average, checkpoints,
exact resume). Under DeepSpeed ZeRO-2/3 it is checked in test_deepspeed_cpu.py."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import launch
from hypothesis import given, settings
from hypothesis import strategies as st

from scalegen.callbacks.ema import EMAState, ema_decay


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


@settings(deadline=None, max_examples=30)
@given(decay=st.floats(0.0, 0.999), n=st.integers(1, 40), seed=st.integers(0, 1000))
def test_constant_decay_matches_the_closed_form(decay, n, seed):
    g = torch.Generator().manual_seed(seed)
    m = Tiny()
    thetas = [torch.randn(3, generator=g, dtype=torch.float64) for _ in range(n + 1)]
    m.w.data = thetas[0].float()
    ema = EMAState(decay=decay)
    ema.init_from(m)
    for t in range(1, n + 1):
        m.w.data = thetas[t].float()
        m.count += 1
        ema.update(m, t)
    # ema_n = d^n theta_0 + (1 - d) sum_{i=1..n} d^(n-i) theta_i
    closed = decay**n * thetas[0] + (1 - decay) * sum(decay ** (n - i) * thetas[i] for i in range(1, n + 1))
    torch.testing.assert_close(ema.shadow["w"].double(), closed, rtol=1e-5, atol=1e-5)
    assert int(ema.shadow["count"]) == n  # integer buffers are copied, not averaged
    assert ema.num_updates == n


def test_warmup_and_every_k_steps():
    assert ema_decay(1, 0.999, warmup_steps=100) == pytest.approx(2 / 11)
    assert ema_decay(50, 0.999, warmup_steps=100) == pytest.approx(51 / 60)
    assert ema_decay(100, 0.999, warmup_steps=100) == 0.999
    assert ema_decay(1, 0.1, warmup_steps=100) == 0.1  # never above the configured decay
    m = Tiny()
    ema = EMAState(decay=0.5, warmup_steps=4, every_n_steps=3)
    ema.init_from(m)
    expected = torch.zeros(3)
    for t in range(1, 10):
        m.w.data = torch.full((3,), float(t))
        updated = ema.update(m, t)
        assert updated == (t % 3 == 0)
        if updated:
            d = ema_decay(t, 0.5, 4)
            expected = d * expected + (1 - d) * m.w.data
    torch.testing.assert_close(ema.shadow["w"], expected)
    assert not ema.update(m, 9)  # a step is folded in once


def test_swapped_puts_the_trained_weights_back():
    m = Tiny()
    ema = EMAState(decay=0.5)
    ema.init_from(m)
    m.w.data = torch.ones(3)
    ema.update(m, 1)
    with ema.swapped(m):
        torch.testing.assert_close(m.w.data, torch.full((3,), 0.5))
    torch.testing.assert_close(m.w.data, torch.ones(3))


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    full, half = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("half")
    launch("ema_worker.py", "--out", str(full), "--steps", "8")
    launch("ema_worker.py", "--out", str(half), "--steps", "4")
    launch(
        "ema_worker.py",
        "--out",
        str(half / "resumed"),
        "--steps",
        "8",
        "--resume-from",
        str(half / "final.ckpt"),
    )
    return full, half


@pytest.mark.slow  # three 2-process Lightning launches: ~1-2 min on 2 cores
def test_ema_under_ddp_matches_the_recursion_on_both_ranks(ddp_runs):
    full, _ = ddp_runs
    r0, r1 = (torch.load(full / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    traj, theta0 = r0["trajectory"], r0["initial"]  # traj[i] = weights after optimizer step i + 1
    assert len(traj) == 8 and r0["num_updates"] == 4  # every 2nd of 8 optimizer steps
    for k, avg in r0["ema"].items():
        if not avg.is_floating_point():
            continue
        # ema_8 = 0.8^4 theta_0 + 0.2 (0.8^3 theta_2 + 0.8^2 theta_4 + 0.8 theta_6 + theta_8)
        closed = 0.8**4 * theta0[k].double() + 0.2 * sum(
            0.8 ** (3 - j) * traj[2 * j + 1][k].double() for j in range(4)
        )
        torch.testing.assert_close(avg.double(), closed, rtol=1e-5, atol=1e-6)
    ckpt = torch.load(full / "final.ckpt", weights_only=True)
    assert set(ckpt["ema_state_dict"]) == set(ckpt["state_dict"])  # keyed like model.state_dict()
    for k in r0["ema"]:
        assert torch.equal(r0["ema"][k], r1["ema"][k])  # identical on every rank, without communication
        assert torch.equal(ckpt["ema_state_dict"][k], r0["ema"][k])  # and what the checkpoint holds


@pytest.mark.slow  # three 2-process Lightning launches: ~1-2 min on 2 cores
def test_validation_runs_with_the_average_and_training_continues_with_the_weights(ddp_runs):
    full, _ = ddp_runs
    r0 = torch.load(full / "rank0.pt", weights_only=True)
    assert len(r0["in_val"]) == 2  # validation at steps 4 and 8
    final_ema, final = r0["ema"], r0["final"]
    for k in final:
        assert torch.equal(r0["in_val"][-1][k], final_ema[k])  # validated with the average
        assert torch.equal(r0["after_val"][-1][k], final[k])  # weights back afterwards
    assert any(not torch.equal(final_ema[k], final[k]) for k in final)


@pytest.mark.slow  # three 2-process Lightning launches: ~1-2 min on 2 cores
def test_resume_restores_the_average_and_its_step_count(ddp_runs):
    _, half = ddp_runs
    saved = torch.load(half / "final.ckpt", weights_only=True)
    for rank in (0, 1):
        resumed = torch.load(half / "resumed" / f"rank{rank}.pt", weights_only=True)
        assert resumed["ema_at_start"].keys() == saved["ema_state_dict"].keys()
        for k, v in saved["ema_state_dict"].items():
            assert torch.equal(resumed["ema_at_start"][k], v)  # the checkpoint's average, not the weights
        assert any(not torch.equal(resumed["initial"][k], v) for k, v in saved["ema_state_dict"].items())
        assert resumed["num_updates"] == 4  # 2 before the checkpoint + 2 after: steps 2, 4 | 6, 8
