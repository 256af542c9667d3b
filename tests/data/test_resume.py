"""Resume mid-epoch: the batches after a restore equal those of an uninterrupted pass."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from scalegen.config.schema import DataConfig
from scalegen.data import build_datamodule

REPO = Path(__file__).resolve().parents[2]


def _cfg(root: Path, workers: int, crop: int = 2) -> DataConfig:
    # Shuffled shards + shuffle buffer + random flip/crop: a resume must reproduce all of it.
    return DataConfig(
        root=str(root),
        batch_size=100,
        num_workers=workers,
        shuffle_buffer=64,
        seed=3,
        random_flip=True,
        random_crop_padding=crop,
        prepare=False,
    )


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
    subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(digits_root),
            str(workers),
            str(tmp_path / "state.pt"),
            str(tmp_path / "out.pt"),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    child = torch.load(tmp_path / "out.pt")
    _assert_same(child["rest"], epoch0[n:])
    _assert_same(child["next"], epoch1)


def test_resume_in_process_without_workers_and_at_epoch_end(digits_root: Path) -> None:
    full = build_datamodule(_cfg(digits_root, 0)).train_dataloader()
    epoch0, epoch1 = _take(full), _take(full)
    for n in (13, 14):  # the last batch, and exactly at the end of the epoch (n = 5: the new-process test)
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
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(ckpt_dir),
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=build_datamodule(_cfg(root, 0)), ckpt_path=resume)
    trainer.save_checkpoint(ckpt_dir / "last.ckpt")
    return model.seen


def test_lightning_checkpoint_resumes_mid_epoch(digits_root: Path, tmp_path: Path) -> None:
    """A real Trainer: 5 steps, checkpoint, resume to 20 steps == 20 steps straight (crosses an epoch)."""
    straight = _fit(digits_root, tmp_path / "a", 20)
    first = _fit(digits_root, tmp_path / "b", 5)
    rest = _fit(digits_root, tmp_path / "c", 20, resume=str(tmp_path / "b" / "last.ckpt"))
    assert first + rest == straight


def test_a_mid_epoch_checkpoint_holds_the_position_once_and_resumes_exactly(digits_root: Path, tmp_path: Path,
                                                                          recwarn: pytest.WarningsChecker) -> None:
    """ModelCheckpoint every 3 steps: the step-6 checkpoint (mid-epoch: 14 batches an epoch) holds the data
    position once, in the DataModule's state, as the 6 batches trained on, and resuming from it to 20 steps
    sees what 20 steps straight see, without Lightning's warning about a non-resumable loader."""
    straight = _fit(digits_root, tmp_path / "a", 20)
    model = _Recorder()
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    trainer = L.Trainer(max_steps=9, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[every])
    trainer.fit(model, datamodule=build_datamodule(_cfg(digits_root, 0)))
    ckpt = torch.load(next((tmp_path / "ck").glob("*step=6.ckpt")), weights_only=False)
    assert ckpt["ShardDataModule"]["train"]["consumed"] == 6 and ckpt["ShardDataModule"]["train"]["epoch"] == 0
    assert "combined_loader" not in ckpt["loops"]["fit_loop"]["state_dict"]  # no second copy, through the loader
    recwarn.clear()
    rest = _fit(digits_root, tmp_path / "c", 20, resume=str(next((tmp_path / "ck").glob("*step=6.ckpt"))))
    head = len(straight) - len(rest)  # the keys of the first 6 batches (the epoch's batches differ in size)
    assert model.seen[:head] + rest == straight and len(model.seen) > head
    assert not [w for w in recwarn if "resuming from a checkpoint that ended before the epoch" in str(w.message)]


def _world_loader(root: Path, world: int, rank: int, workers: int, cache: int, state: dict | None = None):
    dm = build_datamodule(DataConfig(root=str(root), batch_size=50, num_workers=workers, shuffle_buffer=64, seed=3,
                                     random_flip=True, prepare=False, cache_bytes=cache))
    if state is not None:
        dm.load_state_dict(state)
    return dm, dm._loader("train", (rank, world))


def _first(root: Path, world: int, workers: int, cache: int, n: int, state: dict | None = None):
    """Keys of the first `n` batches of every rank of `world`, and the state rank 0 would checkpoint."""
    keys, steps, saved = [], set(), None
    for rank in range(world):
        dm, loader = _world_loader(root, world, rank, workers, cache, state)
        batches = [b["key"] for _, b in zip(range(n), loader)]
        keys += [k for b in batches for k in b]
        steps.add(len(batches))
        saved = saved or dm.state_dict()
    assert len(steps) == 1  # every rank takes the same number of steps (DDP would hang otherwise)
    return keys, saved


@pytest.mark.parametrize("worlds, workers, cache", [((2, 1), 0, 10**8), ((1, 2), 2, 0), ((2, 3), 0, 0),
                                                     ((2, 1, 2), 0, 0)])
def test_an_epoch_resumed_at_other_world_sizes_sees_every_sample_once(digits_root: Path, worlds, workers,
                                                                      cache) -> None:
    """Cached or streamed, with workers or not, resumed once or twice: the ranks before and after together see
    the 1,347 training samples of the epoch exactly once, and the next epoch is whole again."""
    seen, state = _first(digits_root, worlds[0], workers, cache, 5)
    for world in worlds[1:-1]:
        more, state = _first(digits_root, world, workers, cache, 3, state)
        seen += more
    rest, _ = _first(digits_root, worlds[-1], workers, cache, 10**6, state)
    visits = collections.Counter(seen + rest)
    assert len(visits) == 1347 and set(visits.values()) == {1}
    _, loader = _world_loader(digits_root, worlds[-1], 0, workers, cache, state)
    list(loader)  # the rest of the saved epoch, then the next one: as if never interrupted
    _, fresh = _world_loader(digits_root, worlds[-1], 0, workers, cache)
    list(fresh)
    assert [k for b in loader for k in b["key"]] == [k for b in fresh for k in b["key"]]
