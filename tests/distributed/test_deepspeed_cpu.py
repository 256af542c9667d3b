"""The DeepSpeed config scalegen generates trains a family for real in a 2-process DeepSpeed engine
on CPU (DS_ACCELERATOR=cpu, gloo), and its losses match DDP's on the same data and seed.

Tolerances: fp32 ZeRO runs do the same arithmetic as DDP up to summation order, so losses agree to
1e-5 relative and weights to 1e-5 absolute (seen: ~1e-8). bf16-mixed (fp32 weights, bf16 autocast;
8 mantissa bits, relative rounding 2^-8 = 0.4% per operation): per-step losses agree to 1e-2
relative (seen: 2e-4 with the VAE).
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_helpers import launch

STEPS = 6


def load(out, run: str, rank: int = 0) -> dict:
    return torch.load(out / run / f"rank{rank}.pt", weights_only=False)


def check_against_ddp(out, run: str, rel: float, atol: float) -> None:
    ddp, ds = load(out, "ddp"), load(out, run)
    assert ds["zero_stage"] == int(run.split("-")[0][-1])
    assert ds["accumulation"] == ddp["accumulation"] == 2  # global 32 = 8 per rank x 2 ranks x 2
    assert len(ds["losses"]) == STEPS
    for a, b in zip(ds["losses"], ddp["losses"]):
        assert math.isclose(a, b, rel_tol=rel), (run, ds["losses"], ddp["losses"])
    assert ds["losses"][-1] < 0.8 * ds["losses"][0]  # it trains: the loss falls
    for k, v in ddp["final"].items():
        torch.testing.assert_close(ds["final"][k], v, rtol=0, atol=atol)
    # ranks agree on the whole weights
    other = load(out, run, 1)
    for k, v in ds["final"].items():
        torch.testing.assert_close(other["final"][k], v, rtol=0, atol=0)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    launch("engine_worker.py", "--runs", "ddp,zero2,zero3", "--steps", str(STEPS), "--out", str(out))
    return out


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_zero_fp32_matches_ddp(engines, run):
    check_against_ddp(engines, run, rel=1e-5, atol=1e-5)


def test_ema_under_zero3_matches_ddp_and_lives_on_rank_0(engines):
    ddp, zero3 = load(engines, "ddp"), load(engines, "zero3")
    assert set(zero3["ema"]) == set(ddp["final"])  # keyed like model.state_dict()
    for k, v in ddp["ema"].items():
        torch.testing.assert_close(zero3["ema"][k], v, rtol=0, atol=1e-5)
        assert not torch.equal(v, ddp["final"][k])  # the average lags the weights
    assert load(engines, "zero3", 1)["ema"] == {}  # partitioned: only rank 0 keeps the average
    # replicated parameters (DDP, ZeRO-2): every rank keeps the same average, no communication
    for run in ("ddp", "zero2"):
        a, b = load(engines, run, 0)["ema"], load(engines, run, 1)["ema"]
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_zero_checkpoint_consolidates_to_the_trained_weights(engines, run):
    from scalegen.distributed import consolidate_zero_checkpoint, is_zero_checkpoint

    folder = engines / run / "last.ckpt"
    assert is_zero_checkpoint(folder)
    assert len(list((folder / "checkpoint").glob("*optim_states.pt"))) == 2  # really sharded over 2 ranks
    state = consolidate_zero_checkpoint(folder)
    final = load(engines, run)["final"]
    assert set(state) == set(final)  # Lightning's `_forward_module.` prefix is gone
    for k, v in final.items():
        assert state[k].dtype == torch.float32
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def test_zero_checkpoint_is_read_by_load_model_eval_and_release(engines, tmp_path):
    """A sharded checkpoint (Lightning's layout) is what `scalegen sample/eval/release` read like a file."""
    from safetensors.torch import load_file

    from scalegen.checkpoints import checkpoint_sha256, load_model, read_checkpoint
    from scalegen.hub import make_release

    folder = engines / "zero3" / "last.ckpt"
    expected = load(engines, "zero3")
    ckpt = read_checkpoint(folder)
    assert ckpt["global_step"] == STEPS and ckpt["scalegen"]["config"]["trainer"]["strategy"] == "deepspeed_stage_3"
    raw, _ = load_model(folder, use_ema=False)
    ema, cfg = load_model(folder)
    assert cfg.model.family == "vae"
    for k, v in expected["final"].items():
        torch.testing.assert_close(raw.state_dict()[k], v, rtol=0, atol=0)
        torch.testing.assert_close(ema.state_dict()[k], expected["ema"][k], rtol=0, atol=0)
    assert ema.sample(3).shape == (3, 1, 8, 8)
    digest = checkpoint_sha256(folder)
    assert len(digest) == 64 and digest == checkpoint_sha256(folder)
    release = make_release(folder, tmp_path / "release")
    weights = load_file(release / "model.safetensors")
    assert all(torch.equal(weights[k], expected["final"][k]) for k in expected["final"])


@pytest.mark.slow
def test_zero1_bf16_and_offload_match_ddp(tmp_path):
    launch(
        "engine_worker.py",
        "--runs",
        "ddp,zero1,zero2-bf16,zero2-offload,zero3-offload",
        "--steps",
        str(STEPS),
        "--out",
        str(tmp_path),
    )
    check_against_ddp(tmp_path, "zero1", rel=1e-5, atol=1e-5)
    check_against_ddp(tmp_path, "zero2-offload", rel=1e-5, atol=1e-5)
    check_against_ddp(tmp_path, "zero3-offload", rel=1e-5, atol=1e-5)
    bf16, ddp = load(tmp_path, "zero2-bf16"), load(tmp_path, "ddp")
    assert bf16["dtype"] == "torch.float32"  # bf16-mixed: fp32 weights, bf16 autocast compute
    assert bf16["losses"] != ddp["losses"]  # autocast really ran in bf16
    for a, b in zip(bf16["losses"], ddp["losses"]):
        assert math.isclose(a, b, rel_tol=1e-2)


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_zero_checkpoint_at_another_world_size_is_refused_before_the_job_starts(engines, tmp_path, run):
    """A 2-process ZeRO checkpoint resumed by 1 process: one line naming the conversion, before anything runs;
    at its own world size the check lets it through (to the strategy's own refusal of a CPU here)."""
    from scalegen.config import load_config
    from scalegen.errors import UserError
    from scalegen.runtime.train import train

    def cfg(devices: int):
        return load_config("vae/tiny", [f"trainer.strategy=deepspeed_stage_{run[-1]}", f"trainer.devices={devices}",
                                        f"trainer.resume={engines / run / 'last.ckpt'}", f"run.dir={tmp_path}",
                                        "trainer.progress_bar=false", "logging.wandb=false"])

    with pytest.raises(UserError) as caught:
        train(cfg(1))
    message = str(caught.value)
    assert "\n" not in message and "written by 2 processes) with 1" in message
    assert "deepspeed.checkpoint.ds_to_universal" in message and "load_universal" in message
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing ran
    with pytest.raises(UserError, match="needs GPUs"):
        train(cfg(2))
