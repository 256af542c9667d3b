"""The optimizer builder: the fused CPU kernel computes PyTorch's reference update, and the schedule's shape."""

from __future__ import annotations

import math

import pytest
import torch

from scalegen.config.schema import OptimConfig
from scalegen.optim import build_optimizer, lr_factor


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_cpu_optimizer_is_fused_and_matches_the_reference_loop(name: str) -> None:
    torch.manual_seed(0)
    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=0.1, schedule="cosine", warmup_steps=3)
    nets = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    ours = build_optimizer(nets[0].parameters(), cfg, total_steps=20)
    assert ours["optimizer"].defaults["fused"] is True
    ref_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]
    extra = {"momentum": cfg.momentum} if name == "sgd" else {"betas": tuple(cfg.betas), "eps": cfg.eps}
    ref = ref_cls(nets[1].parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False, **extra)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: lr_factor(s, cfg, 20))
    x = torch.randn(16, 6)
    for _ in range(8):
        for net, opt, sched in ((nets[0], ours["optimizer"], ours["lr_scheduler"]["scheduler"]),
                                (nets[1], ref, ref_sched)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
            sched.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unfused_when_asked_and_schedule_shape() -> None:
    cfg = OptimConfig(schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    opt = build_optimizer(torch.nn.Linear(2, 2).parameters(), cfg, 10, fuse_on_cpu=False)["optimizer"]
    assert not opt.defaults.get("fused")
    assert [lr_factor(s, cfg, 10) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cfg, 10) == 1.0 and lr_factor(10, cfg, 10) == pytest.approx(0.1)
    assert lr_factor(7, cfg, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
