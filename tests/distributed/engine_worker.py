"""One rank of the DeepSpeed-vs-DDP check, launched 2x by torch.distributed.run (see test_deepspeed_cpu.py).

For each requested run (`ddp`, `zero1`, `zero2`, `zero3`, optionally suffixed `-bf16` or `-offload`)
it trains a scalegen family's model from the same seed on the same per-rank micro-batches, either
with a bare DeepSpeed engine configured by `scalegen.distributed.deepspeed_config` or with torch DDP,
and keeps an EMA of the weights through `scalegen.callbacks.ema.EMAState`. It writes the loss of
every optimizer step (mean over ranks and micro-batches), the final whole weights and the EMA to
OUT/<run>/rank{r}.pt; DeepSpeed runs also save their sharded ZeRO checkpoint to OUT/<run>/zero.
One launch runs all of them: importing DeepSpeed dominates the cost on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_helpers import DIGITS_SPEC, build_model, digit_batches, trainer_config  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

EMA_DECAY = 0.9  # small, so a few steps move the average visibly


class LossOf(torch.nn.Module):
    """The family's training objective as a module's forward, which is what an engine drives. The family
    module is held as `_forward_module`, as Lightning's DeepSpeed wrapper holds it, so the engine's
    checkpoint has the layout of a Lightning DeepSpeed checkpoint."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._forward_module = model

    def forward(self, batch: dict) -> torch.Tensor:
        return self._forward_module.loss(batch)[0]


def mean_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def run_deepspeed(name: str, args: argparse.Namespace, rank: int, world: int) -> dict:
    import deepspeed

    from scalegen.callbacks.ema import EMAState
    from scalegen.distributed import batch_plan, deepspeed_config
    from scalegen.distributed.gather import full_parameters
    from scalegen.optim import make_optimizer

    stage = int(name.split("-")[0][-1])
    cfg = trainer_config(
        strategy=f"deepspeed_stage_{stage}",
        precision="bf16-mixed" if "bf16" in name else "32-true",
        offload_optimizer="offload" in name,
        global_batch_size=args.global_batch,
        gradient_clip_val=args.clip,
    )
    plan = batch_plan(cfg.trainer, args.micro, cfg.optim, world=world)
    model = build_model(cfg)
    batches = digit_batches(rank, world, args.micro, plan.accumulation * args.steps)
    optimizer = make_optimizer(model.parameters(), cfg.optim, lr=plan.lr)
    from scalegen.optim import lr_factor

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim, args.steps))
    engine, _, _, _ = deepspeed.initialize(
        model=LossOf(model),
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(cfg.trainer, args.micro, world=world),
    )
    net = engine.module._forward_module
    ema = EMAState(decay=EMA_DECAY)
    ema.init_from(net)
    losses = []
    for step in range(args.steps):
        total = 0.0
        for micro in range(plan.accumulation):
            loss = engine(batches[step * plan.accumulation + micro])
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            total += float(loss.detach().float())
        losses.append(mean_over_ranks(total / plan.accumulation))
        ema.update(net, step + 1)
    with full_parameters(net):
        final = {k: v.detach().float().clone() for k, v in net.state_dict().items()}
    # Where and how Lightning's DeepSpeed strategy saves `last.ckpt`: a folder, tag `checkpoint`, and the
    # rest of the Lightning checkpoint (scalegen's config, the EMA, the step) as the engine's client state.
    client_state = {
        "scalegen": {"config": OmegaConf.to_container(cfg, resolve=True), "data_spec": asdict(DIGITS_SPEC)},
        "ema_state_dict": ema.weights(),
        "global_step": args.steps,
    }
    engine.save_checkpoint(str(Path(args.out) / name / "last.ckpt"), tag="checkpoint", client_state=client_state)
    return {
        "losses": losses,
        "final": final,
        "ema": ema.weights(),
        "zero_stage": engine.zero_optimization_stage(),
        "dtype": str(next(net.parameters()).dtype),
        "accumulation": plan.accumulation,
        "lr": [g["lr"] for g in engine.optimizer.param_groups],
    }


def run_ddp(args: argparse.Namespace, rank: int, world: int) -> dict:
    from scalegen.callbacks.ema import EMAState
    from scalegen.distributed import batch_plan
    from scalegen.optim import lr_factor, make_optimizer

    cfg = trainer_config(strategy="ddp", global_batch_size=args.global_batch, gradient_clip_val=args.clip)
    plan = batch_plan(cfg.trainer, args.micro, cfg.optim, world=world)
    model = build_model(cfg)
    batches = digit_batches(rank, world, args.micro, plan.accumulation * args.steps)
    ddp = torch.nn.parallel.DistributedDataParallel(LossOf(model))
    optimizer = make_optimizer(ddp.parameters(), cfg.optim, lr=plan.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim, args.steps))
    ema = EMAState(decay=EMA_DECAY)
    ema.init_from(model)
    losses = []
    for step in range(args.steps):
        total = 0.0
        for micro in range(plan.accumulation):
            last = micro == plan.accumulation - 1
            with torch.enable_grad() if last else ddp.no_sync():  # all-reduce once per optimizer step
                loss = ddp(batches[step * plan.accumulation + micro])
                (loss / plan.accumulation).backward()
            total += float(loss.detach())
        if args.clip:
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), args.clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(total / plan.accumulation))
        ema.update(model, step + 1)
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {
        "losses": losses,
        "final": final,
        "ema": ema.weights(),
        "zero_stage": 0,
        "dtype": "torch.float32",
        "accumulation": plan.accumulation,
        "lr": [g["lr"] for g in optimizer.param_groups],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="ddp,zero2,zero3")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in args.runs.split(","):
        torch.manual_seed(0)
        result = run_ddp(args, rank, world) if name == "ddp" else run_deepspeed(name, args, rank, world)
        (Path(args.out) / name).mkdir(parents=True, exist_ok=True)
        torch.save(result, Path(args.out) / name / f"rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
