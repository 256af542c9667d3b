"""Resume mid-epoch: the batches after a restore equal those of an uninterrupted pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from scalegen.config.schema import DataConfig
from scalegen.data import build_datamodule

REPO = Path(__file__).resolve().parents[2]


def _cfg(root: Path, workers: int) -> DataConfig:
    # Shuffled shards + shuffle buffer + random flip/crop: a resume must reproduce all of it.
    return DataConfig(root=str(root), batch_size=100, num_workers=workers, shuffle_buffer=64, seed=3,
                      random_flip=True, random_crop_padding=2, prepare=False)


def _take(loader, n: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append({"key": batch["key"], "x": batch["x"].clone()})
        if n is not None and len(out) == n:
            break
    return out


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (p, q) in enumerate(zip(a, b)):
        assert p["key"] == q["key"], f"batch {i}: different samples"
        assert torch.equal(p["x"], q["x"]), f"batch {i}: different augmentation"


CHILD = """
import sys, torch
from scalegen.config.schema import DataConfig
from scalegen.data import build_datamodule
root, workers, state_path, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
cfg = DataConfig(root=root, batch_size=100, num_workers=workers, shuffle_buffer=64, seed=3,
                 random_flip=True, random_crop_padding=2, prepare=False)
dm = build_datamodule(cfg)
dm.load_state_dict(torch.load(state_path))
loader = dm.train_dataloader()
rest = [{"key": b["key"], "x": b["x"]} for b in loader]                    # rest of the saved epoch
nxt = [{"key": b["key"], "x": b["x"]} for _, b in zip(range(2), loader)]  # the next epoch starts right
torch.save({"rest": rest, "next": nxt}, out)
"""


def test_resume_in_a_new_process_continues_exactly(digits_root: Path, tmp_path: Path) -> None:
    workers, n = 2, 5
    full = build_datamodule(_cfg(digits_root, workers)).train_dataloader()
    epoch0, epoch1 = _take(full), _take(full, 2)
    assert len(epoch0) == 14

    dm = build_datamodule(_cfg(digits_root, workers))
    loader = dm.train_dataloader()
    _assert_same(_take(loader, n), epoch0[:n])
    torch.save(dm.state_dict(), tmp_path / "state.pt")
    assert dm.state_dict()["train"]["consumed"] == n

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", CHILD, str(digits_root), str(workers), str(tmp_path / "state.pt"),
                    str(tmp_path / "out.pt")], check=True, env=env, timeout=300)
    child = torch.load(tmp_path / "out.pt")
    _assert_same(child["rest"], epoch0[n:])
    _assert_same(child["next"], epoch1)


def test_resume_in_process_without_workers_and_at_epoch_end(digits_root: Path) -> None:
    full = build_datamodule(_cfg(digits_root, 0)).train_dataloader()
    epoch0, epoch1 = _take(full), _take(full)
    for n in (1, 13, 14):  # early, last batch, exactly at the end of the epoch
        dm = build_datamodule(_cfg(digits_root, 0))
        _take(dm.train_dataloader(), n)
        state = dm.state_dict()
        fresh = build_datamodule(_cfg(digits_root, 0))
        fresh.load_state_dict(state)
        loader = fresh.train_dataloader()
        _assert_same(_take(loader), epoch0[n:] if n < 14 else epoch1)


class _Recorder(L.LightningModule):
    """Trains nothing; records the keys of every training batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen += batch["key"]
        return (self.w * batch["x"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(root: Path, ckpt_dir: Path, max_steps: int, resume: str | None = None) -> list[str]:
    model = _Recorder()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(ckpt_dir),
                        enable_checkpointing=False)
    trainer.fit(model, datamodule=build_datamodule(_cfg(root, 0)), ckpt_path=resume)
    trainer.save_checkpoint(ckpt_dir / "last.ckpt")
    return model.seen


def test_lightning_checkpoint_resumes_mid_epoch(digits_root: Path, tmp_path: Path) -> None:
    """Through a real Trainer: 5 steps, checkpoint, resume to 20 steps == 20 steps straight (crosses an epoch)."""
    straight = _fit(digits_root, tmp_path / "a", 20)
    first = _fit(digits_root, tmp_path / "b", 5)
    rest = _fit(digits_root, tmp_path / "c", 20, resume=str(tmp_path / "b" / "last.ckpt"))
    assert first + rest == straight
