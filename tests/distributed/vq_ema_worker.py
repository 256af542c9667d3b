"""One rank of the VQ-VAE codebook-under-DDP check (torch.distributed, gloo), launched 2x by torchrun.

Each rank runs the vqvae family's training loss (which updates the codebook: EMA statistics all-reduced,
dead-code restarts broadcast) on its half of every global batch of digits, then writes OUT/{name}-rank{r}.pt
with its quantizer's state. `vq_model` is also the test's one-process reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_helpers import DIGITS_SPEC, digit_batches  # noqa: E402

from scalegen.config.schema import OptimConfig  # noqa: E402
from scalegen.families.vqvae import VQVAE, VQVAEConfig  # noqa: E402

MICRO, STEPS = 16, 4  # rows per rank per step, steps
SETTINGS = {  # EMA only (comparable with one process); and restarts every step (rank 0's picks, broadcast)
    "ema": dict(init_from_data=False, restart_every=0),
    "restarts": dict(init_from_data=True, restart_every=1, dead_code_threshold=0.5),
}


def vq_model(name: str) -> VQVAE:
    """The same weights on every process (seeded); the encoder is never stepped, only the codebook moves."""
    torch.manual_seed(0)
    cfg = VQVAEConfig(hidden=[8, 8], res_blocks=1, code_dim=4, num_codes=16, ema_decay=0.8, **SETTINGS[name])
    return VQVAE(cfg, OptimConfig(), DIGITS_SPEC).train()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in SETTINGS:
        model = vq_model(name)
        torch.manual_seed(100 + rank)  # the ranks' own random draws differ, as in a real run
        with torch.no_grad():
            for batch in digit_batches(rank, world, MICRO, STEPS):
                model.loss(batch)
        torch.save(model.quantizer.state_dict(), out / f"{name}-rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
