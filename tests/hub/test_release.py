"""Releases and fine-tuning: release -> finetune round trip on the digits, checksums, head re-init, URLs."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scalegen.cli.main import main

TINY = [
    "model.hidden=[32]",
    "model.latent_dim=8",
    "trainer.max_epochs=null",
    "trainer.progress_bar=false",
    "logging.wandb=false",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=5",
]

# Adam moves each weight by about lr a step whatever the gradient: 1e-12 leaves a 3-step run within 1e-9 of
# where it started (lr must be > 0), far below the change a step at the recipe's lr makes.
STILL = ["optim.lr=1e-12", "optim.weight_decay=0.0", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Prepared digits and a cache folder, through the environment variables scalegen reads."""
    from scalegen.data import prepare_dataset

    root = tmp_path_factory.mktemp("hub")
    prepare_dataset("digits", root / "data" / "digits", progress=False)
    saved = {k: os.environ.get(k) for k in ("SCALEGEN_DATA", "SCALEGEN_CACHE")}
    os.environ.update(SCALEGEN_DATA=str(root / "data"), SCALEGEN_CACHE=str(root / "cache"))
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def release(env):
    """A tiny VAE trained 20 steps with EMA, and its release."""
    assert (
        main(
            [
                "train",
                "quickstart",
                *TINY,
                "trainer.max_steps=22",
                "ema.enabled=true",
                "ema.decay=0.9",
                f"run.dir={env}/runs",
                "run.name=base",
            ]
        )
        == 0
    )
    assert main(["release", str(env / "runs" / "base"), "--out", str(env / "release")]) == 0
    return env / "release"


def finetune(env: Path, source: str, name: str, *overrides: str) -> int:
    return main(
        [
            "finetune",
            source,
            "quickstart",
            *TINY,
            "trainer.max_steps=3",
            f"run.dir={env}/runs",
            f"run.name={name}",
            *overrides,
        ]
    )


def last_weights(env: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(env / "runs" / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_release_contents(release, env):
    files = {p.name for p in release.iterdir()}
    assert {
        "model.safetensors",
        "model_ema.safetensors",
        "config.yaml",
        "data_spec.json",
        "release.json",
        "README.md",
        "SHA256SUMS",
    } <= files
    assert not any(f.endswith((".pt", ".ckpt", ".pkl", ".bin")) for f in files)  # no pickles
    # the independent tool agrees with our sums
    subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=release, check=True)
    ckpt = torch.load(env / "runs" / "base" / "checkpoints" / "last.ckpt", weights_only=True)
    raw, ema = load_file(release / "model.safetensors"), load_file(release / "model_ema.safetensors")
    assert raw.keys() == ema.keys() == ckpt["state_dict"].keys()
    assert all(torch.equal(raw[k], ckpt["state_dict"][k]) for k in raw)
    assert all(torch.equal(ema[k], ckpt["ema_state_dict"][k]) for k in ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    card = (release / "README.md").read_text()
    for needle in [
        "`vae`",
        "digits",
        "Apache-2.0",
        "scalegen finetune",
        "model.sample",
        "1 node(s) x 1 device(s)",
    ]:
        assert needle in card, needle
    assert main(["config", str(release / "config.yaml")]) == 0  # the recipe it trained with still loads


def test_finetune_without_a_recipe_trains_the_one_the_release_was_trained_with(release, env):
    """`scalegen finetune REL key=value ...`: no recipe named, so the release's config.yaml is the recipe (the
    first override is not taken for a recipe name); with a vanishing lr the run ends at the release's weights."""
    assert main(["finetune", str(release), *STILL, "trainer.max_steps=3", f"run.dir={env}/runs",
                 "run.name=ft-own"]) == 0
    ema = load_file(release / "model_ema.safetensors")
    final = last_weights(env, "ft-own")
    assert all(torch.allclose(final[k], ema[k], rtol=0, atol=1e-9) for k in ema)
    saved = (env / "runs" / "ft-own" / "config.yaml").read_text()
    assert "hidden:\n  - 32\n" in saved and "latent_dim: 8" in saved  # the release's model, not the quickstart's


def test_finetune_round_trip_starts_from_the_release(release, env):
    from scalegen.hub import load_release_model

    # A vanishing lr: the optimizer moves nothing measurable, so the run ends at the weights it started from.
    assert finetune(env, str(release), "ft-zero", *STILL) == 0
    ema = load_file(release / "model_ema.safetensors")  # the EMA weights are the default start
    final = last_weights(env, "ft-zero")
    assert all(torch.allclose(final[k], ema[k], rtol=0, atol=1e-9) for k in ema)
    # and a real fine-tune trains from there, from a file:// URL
    assert finetune(env, release.as_uri(), "ft", "finetune.use_ema=false") == 0
    assert any(not torch.equal(last_weights(env, "ft")[k], ema[k]) for k in ema)
    model, cfg = load_release_model(release)
    assert cfg.model.family == "vae" and model.sample(4).shape == (4, 1, 8, 8)


def test_tampered_weights_are_refused(release, env, tmp_path, capsys):
    bad = tmp_path / "tampered"
    shutil.copytree(release, bad)
    data = bytearray((bad / "model_ema.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    (bad / "model_ema.safetensors").write_bytes(bytes(data))
    assert finetune(env, str(bad), "ft-bad") == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "model_ema.safetensors" in err
    assert not (env / "runs" / "ft-bad").exists()  # refused before anything ran


def test_mismatched_head_is_refused_unless_named_for_reinit(release, env, capsys):
    # latent 8 -> 4 changes the encoder's output layer and the decoder's input layer
    assert finetune(env, str(release), "ft-head", "model.latent_dim=4") == 2
    err = capsys.readouterr().err
    for name in [
        "encoder.net.2.weight: release (16, 32) vs model (8, 32)",
        "encoder.net.2.bias",
        "decoder.net.0.weight: release (32, 8) vs model (32, 4)",
        "finetune.reinit",
    ]:
        assert name in err, name
    assert (
        finetune(
            env,
            str(release),
            "ft-head",
            "model.latent_dim=4",
            *STILL,
            "finetune.reinit=[encoder.net.2.*,decoder.net.0.weight]",
        )
        == 0
    )
    final, ema = last_weights(env, "ft-head"), load_file(release / "model_ema.safetensors")
    for k in ["encoder.net.0.weight", "encoder.net.0.bias", "decoder.net.0.bias", "decoder.net.2.weight"]:
        assert torch.allclose(final[k], ema[k], rtol=0, atol=1e-9), k  # kept
    assert final["encoder.net.2.weight"].shape == (8, 32) and final["decoder.net.0.weight"].shape == (32, 4)


class _Counting(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).hits.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


def test_https_style_url_is_downloaded_once_verified_and_cached(release, env, tmp_path):
    from scalegen.errors import UserError
    from scalegen.hub import fetch_release

    served = tmp_path / "www"
    shutil.copytree(release, served / "rel")
    handler = functools.partial(_Counting, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/rel"
    try:
        _Counting.hits = []
        first = fetch_release(url)
        assert first.is_relative_to(Path(os.environ["SCALEGEN_CACHE"]))
        assert len(_Counting.hits) == len((release / "SHA256SUMS").read_text().splitlines()) + 1
        _Counting.hits = []
        assert fetch_release(url) == first and _Counting.hits == ["/rel/SHA256SUMS"]  # cached: sums only
        # a modified file on the server is refused (a new download: new sums file -> new cache entry)
        (served / "rel" / "SHA256SUMS").write_text((served / "rel" / "SHA256SUMS").read_text() + "\n")
        data = bytearray((served / "rel" / "model.safetensors").read_bytes())
        data[-1] ^= 0x01
        (served / "rel" / "model.safetensors").write_bytes(bytes(data))
        with pytest.raises(UserError, match="checksum mismatch .*model.safetensors"):
            fetch_release(url)
        with pytest.raises(UserError, match="pins"):
            fetch_release(url, sha256="0" * 64)
    finally:
        server.shutdown()
