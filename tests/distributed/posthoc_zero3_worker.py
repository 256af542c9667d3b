"""One rank of the post-hoc EMA under DeepSpeed ZeRO-3 (a 2-process CPU engine, gloo; see
test_posthoc_ema.py), launched 2x by torch.distributed.run.

Trains the deterministic autoencoder of posthoc_worker.py with a ZeRO-3 engine configured by
`scalegen.distributed.deepspeed_config`, keeps the post-hoc EMAs (sigma_rel 0.05 and 0.10, snapshots every
2 steps into OUT/snapshots, one shard per rank) and a directly tracked sigma_rel 0.07 through `PostHocEMA`
(`start`, `update_averages` and `write_snapshot`: what the callback calls), and records the whole weights
after every step. Halfway it saves an engine checkpoint with the callbacks' state as client state (as
Lightning's DeepSpeed strategy does: OUT/ckpt, tag `checkpoint`); after the run a second engine loads it,
the callbacks continue from it and train the second half again on the same batches. Writes OUT/rank{r}.pt.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_helpers import DIGITS_SPEC, digit_batches  # noqa: E402
from engine_worker import LossOf  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import scalegen.families  # noqa: E402, F401  (registers the built-in families)
from scalegen.callbacks.ema import update_averages  # noqa: E402
from scalegen.callbacks.posthoc_ema import PostHocEMA  # noqa: E402
from scalegen.config.schema import Config, DataConfig  # noqa: E402
from scalegen.distributed import deepspeed_config  # noqa: E402
from scalegen.distributed.gather import full_parameters, is_zero3_partitioned  # noqa: E402
from scalegen.optim import make_optimizer  # noqa: E402
from scalegen.registry import get_family  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--micro", type=int, default=8)
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    ae = get_family("ae")
    cfg = OmegaConf.structured(Config(model=ae.config(hidden=[32], code_dim=8), data=DataConfig(root="unused")))
    cfg.optim.lr = 1e-2
    cfg.trainer.strategy = "deepspeed_stage_3"
    cfg.trainer.global_batch_size = args.micro * world

    def new_engine() -> tuple:
        torch.manual_seed(0)
        model = ae.module(cfg.model, cfg.optim, DIGITS_SPEC)
        optimizer = make_optimizer(model.parameters(), cfg.optim, lr=cfg.optim.lr)
        engine, _, _, _ = deepspeed.initialize(
            model=LossOf(model), optimizer=optimizer, config=deepspeed_config(cfg.trainer, args.micro, world=world)
        )
        net = engine.module._forward_module  # LossOf's own attribute (Lightning's layout), not DeepSpeed's
        assert is_zero3_partitioned(net)
        return engine, net

    def new_callbacks(folder: Path) -> tuple[PostHocEMA, PostHocEMA]:
        return (PostHocEMA(folder / "snapshots", [0.05, 0.10], every_n_steps=2),
                PostHocEMA(folder / "direct", [0.07], every_n_steps=10**9))

    def train(engine, net, posthoc, direct, first: int) -> dict[int, dict]:
        trajectory = {}
        for step in range(first, args.steps + 1):
            engine.backward(engine(batches[step - 1]))
            engine.step()
            update_averages([*posthoc.states, *direct.states], net, step)  # one gather for all three averages
            if step % posthoc.every_n_steps == 0:
                posthoc.write_snapshot(step, rank == 0)
            with full_parameters(net):
                trajectory[step] = {k: v.detach().clone() for k, v in net.state_dict().items()}
            if step == half:
                client = {"posthoc": posthoc.state_dict(), "direct": direct.state_dict()}
                engine.save_checkpoint(str(out / "ckpt"), tag="checkpoint", client_state=client)
        return trajectory

    batches = digit_batches(rank, world, args.micro, args.steps)
    half = args.steps // 2
    engine, net = new_engine()
    posthoc, direct = new_callbacks(out)
    for callback in (posthoc, direct):
        callback.start(net)
    trajectory = train(engine, net, posthoc, direct, 1)

    # Resume from the halfway checkpoint: each rank gets its own client state (its own slices) back.
    engine2, net2 = new_engine()
    _, client = engine2.load_checkpoint(str(out / "ckpt"), tag="checkpoint")
    posthoc2, direct2 = new_callbacks(out / "resumed")
    for callback, key in ((posthoc2, "posthoc"), (direct2, "direct")):
        callback.load_state_dict(client[key])
        callback.start(net2)
    at_start = [s.weights() for s in posthoc2.states]
    resumed = train(engine2, net2, posthoc2, direct2, half + 1)
    torch.save(
        {
            "trajectory": trajectory,
            "posthoc": [s.weights() for s in posthoc.states],
            "direct": direct.states[0].weights(),
            "split": posthoc.states[0].split,
            "shapes": posthoc.states[0].shapes,
            "resumed": {
                "trajectory": resumed,
                "at_start": at_start,
                "posthoc": [s.weights() for s in posthoc2.states],
                "direct": direct2.states[0].weights(),
                "num_updates": [s.num_updates for s in (*posthoc2.states, *direct2.states)],
            },
        },
        out / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
