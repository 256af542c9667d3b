"""Writing shards: atomic per shard, re-runs keep verified shards, packing your own folders, the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scalegen.cli.main import main
from scalegen.config import load_config
from scalegen.config.schema import DataConfig
from scalegen.data import DataError, build_datamodule, prepare_dataset, read_manifest
from scalegen.data.decode import encode_wav
from scalegen.data.manifest import sha256_file
from scalegen.data.pack import pack_folder
from scalegen.data.prepare import PREPARERS, Prepared
from scalegen.runtime.train import train


def _state(root: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.glob("*.tar"))}


def test_rerun_keeps_verified_shards_and_rewrites_a_damaged_one(digits_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "d"
    prepare_dataset("digits", root, progress=False)
    before = _state(root)
    assert [p for p in before] == sorted(p.name for p in digits_root.glob("*.tar"))
    prepare_dataset("digits", root, progress=False)
    assert _state(root) == before  # nothing rewritten
    damaged = root / "train-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1000] + bytes(1000))
    prepare_dataset("digits", root, progress=False)
    after = _state(root)
    assert after["train-000001.tar"] != before["train-000001.tar"]
    assert {k: v for k, v in after.items() if k != "train-000001.tar"} == {
        k: v for k, v in before.items() if k != "train-000001.tar"
    }
    m = read_manifest(str(root))
    assert all(sha256_file(root / s.name) == s.sha256 for sp in m.splits.values() for s in sp.shards)
    assert sha256_file(damaged) == sha256_file(digits_root / "train-000001.tar")  # deterministic shards


def test_crash_mid_preparation_leaves_no_partial_shard_and_resumes(tmp_path: Path) -> None:
    calls = {"n": 0}

    def encode(split: str, i: int, item: int) -> dict:
        calls["n"] += 1
        if crash and i == 25:
            raise KeyboardInterrupt  # the process dies while writing the third shard
        return {"__key__": f"s{item:04d}", "cls": b"1", "png": _png(np.full((4, 4), item % 256, np.uint8))}

    def fake(source: str | None) -> Prepared:
        return Prepared(
            kind="image",
            shape=[1, 4, 4],
            class_names=["a", "b"],
            splits={"train": list(range(40))},
            encode=encode,
            source={"sha256": "x"},
            notes="",
            shard_size=10,
        )

    PREPARERS["fake-for-test"] = fake
    try:
        crash = True
        with pytest.raises(KeyboardInterrupt):
            prepare_dataset("fake-for-test", tmp_path, progress=False)
        assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
        assert not (tmp_path / "manifest.json").exists() and (tmp_path / ".progress.json").exists()
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the temporary was not renamed
        done = _state(tmp_path)
        crash, calls["n"] = False, 0
        m = prepare_dataset("fake-for-test", tmp_path, progress=False)
        assert calls["n"] == 20  # the two finished shards were verified, not re-encoded
        assert {k: v for k, v in _state(tmp_path).items() if k in done} == done
        assert [s.count for s in m.splits["train"].shards] == [10, 10, 10, 10]
    finally:
        del PREPARERS["fake-for-test"]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(root: Path, labelled: bool = True, sizes: tuple = ((10, 12),)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = {}
    for c, cls in enumerate(["cat", "dog", "eel"]):
        for i in range(7):
            h, w = sizes[(c + i) % len(sizes)]
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            folder = root / cls if labelled else root
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{cls}.{i}.png"  # a dot in the name: keys must not split there
            Image.fromarray(arr).save(folder / name)
            images[f"{cls}/{name}" if labelled else name] = arr
    return images


def test_pack_labelled_images_with_held_out_split(tmp_path: Path) -> None:
    images = _image_folder(tmp_path / "src")
    m = pack_folder(tmp_path / "src", tmp_path / "out", shard_size=8, test_fraction=0.2, progress=False)
    assert m.class_names == ["cat", "dog", "eel"] and m.shape == [3, 10, 12] and m.kind == "image"
    assert {k: v.count for k, v in m.splits.items()} == {"train": 17, "test": 4}
    dm = build_datamodule(DataConfig(dataset="src", root=str(tmp_path / "out"), batch_size=5, prepare=False))
    seen = 0
    for loader in (dm.train_dataloader(), dm.test_dataloader()):
        for batch in loader:
            for key, x, y in zip(batch["key"], batch["x"], batch["y"]):
                cls, stem = key.split("/")
                arr = images[f"{cls}/{stem.replace('_', '.')}.png"]
                assert torch.equal(x, torch.from_numpy(arr).permute(2, 0, 1)) and m.class_names[int(y)] == cls
                seen += 1
    assert seen == 21
    pack_folder(tmp_path / "src", tmp_path / "train-only", progress=False)  # nothing held out
    dm = build_datamodule(DataConfig(root=str(tmp_path / "train-only"), prepare=False))
    with pytest.raises(DataError, match=r"has no 'test' split \(it has \['train'\]\): hold one out when packing "
                                        r"\(`scalegen data pack SRC --out DIR --test-fraction 0.1`\)"):
        dm.test_dataloader()


def test_a_folder_packed_without_held_out_splits_trains_without_validation(tmp_path: Path) -> None:
    # `scalegen data pack` holds nothing out by default; training on it names both ways on, and the second
    # trains: no validation, so no "best" checkpoint by a validation metric, only last.ckpt.
    _image_folder(tmp_path / "src")
    pack_folder(tmp_path / "src", tmp_path / "packed", progress=False)
    data = ["data.dataset=src", f"data.root={tmp_path / 'packed'}", "data.prepare=false"]
    with pytest.raises(DataError, match=r"has no 'val' or 'test' split \(it has \['train'\]\): hold one out when "
                                        r"packing \(`scalegen data pack SRC --out DIR --val-fraction 0.1`\) or train "
                                        r"without validation \(trainer.limit_val_batches=0\)$"):
        build_datamodule(load_config("vae/tiny", data).data).setup("fit")
    run = train(load_config("vae/tiny", [*data, "trainer.limit_val_batches=0", "trainer.max_steps=3",
                                         "trainer.max_epochs=null", "logging.wandb=false", "trainer.progress_bar=false",
                                         f"run.dir={tmp_path}", "run.name=r"]))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]


def test_shards_given_as_a_source_name_the_settings_that_train_on_them(tmp_path: Path) -> None:
    # data.source is the upstream copy a built-in is prepared from; the digits ignore it, so shards put there
    # used to train the digits without a word.
    _image_folder(tmp_path / "src")
    pack_folder(tmp_path / "src", tmp_path / "packed", progress=False)
    dm = build_datamodule(DataConfig(dataset="digits", root=str(tmp_path / "digits"), source=str(tmp_path / "packed")))
    with pytest.raises(DataError, match=f"set data.dataset=src data.root={tmp_path / 'packed'} data.prepare=false$"):
        dm.spec  # noqa: B018
    assert not (tmp_path / "digits").exists()


def test_pack_unlabelled_images_of_mixed_sizes_needs_resize(tmp_path: Path) -> None:
    _image_folder(tmp_path / "src", labelled=False, sizes=((10, 12), (16, 16)))
    m = pack_folder(tmp_path / "src", tmp_path / "out", progress=False)
    assert m.shape == [3, 0, 0] and m.class_names == []
    with pytest.raises(DataError, match="resize"):
        build_datamodule(DataConfig(root=str(tmp_path / "out"), prepare=False)).spec  # noqa: B018
    dm = build_datamodule(DataConfig(root=str(tmp_path / "out"), resize=8, center_crop=8, batch_size=7, prepare=False))
    batch = next(iter(dm.train_dataloader()))
    assert dm.spec.shape == (3, 8, 8) and batch["x"].shape == (7, 3, 8, 8) and (batch["y"] == -1).all()


def test_pack_audio_and_reject_mixed_rates(tmp_path: Path) -> None:
    for i, cls in enumerate(["yes", "no"]):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for j in range(3):
            wav = encode_wav((np.sin(np.arange(800 + 100 * j) * 0.1 * (i + 1)) * 0.5).astype(np.float32), 16000)
            (tmp_path / "src" / cls / f"{j}.wav").write_bytes(wav)
    m = pack_folder(tmp_path / "src", tmp_path / "out", progress=False)
    assert (m.kind, m.sample_rate, m.shape, m.class_names) == ("audio", 16000, [1, 0], ["no", "yes"])
    dm = build_datamodule(DataConfig(root=str(tmp_path / "out"), clip_samples=1000, batch_size=6, prepare=False))
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (6, 1, 1000) and batch["x"].abs().max() <= 0.5 + 1e-4
    (tmp_path / "src" / "no" / "3.wav").write_bytes(encode_wav(np.zeros(10, np.int16), 8000))
    with pytest.raises(DataError, match="sample rates differ"):
        pack_folder(tmp_path / "src", tmp_path / "out2", progress=False)


def test_cli_prepare_and_pack(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "prepare", "digits", "--out", str(tmp_path / "d"), "--shard-size", "400"]) == 0
    assert "train 1347 in 4 shards" in capsys.readouterr().out
    _image_folder(tmp_path / "src")
    assert main(["data", "pack", str(tmp_path / "src"), "--out", str(tmp_path / "p"), "--val-fraction", "0.3"]) == 0
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["splits"]["val"]["count"] == 6
    assert main(["data", "prepare", "digitz", "--out", str(tmp_path / "x")]) == 2
    assert "Did you mean 'digits'" in capsys.readouterr().err
    assert main(["data", "pack", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2


def test_resampled_stream_is_infinite_and_resumes_reproducibly(digits_root: Path) -> None:
    cfg = DataConfig(root=str(digits_root), batch_size=50, resampled=True, seed=1, prepare=False)
    dm = build_datamodule(cfg)
    loader = dm.train_dataloader()
    with pytest.raises(TypeError):
        len(loader)  # infinite: Lightning runs it by trainer.max_steps
    it = iter(loader)
    keys = [k for _ in range(60) for k in next(it)["key"]]  # 3000 samples: more than an epoch's worth
    assert len(keys) == 3000 and len(set(keys)) < 1347  # drawn with replacement
    state = dm.state_dict()
    assert state["train"]["consumed"] == 60

    def resumed() -> list[list[str]]:
        again = build_datamodule(cfg)
        again.load_state_dict(state)
        it2 = iter(again.train_dataloader())
        return [next(it2)["key"] for _ in range(3)]

    # Not a replay of everything seen so far: fresh draws seeded by the position, the same every time.
    assert resumed() == resumed()
