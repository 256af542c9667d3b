"""WaveNet: causality and receptive field by gradients, fast generation, exact NLL, FSDD run, WAV output."""

from __future__ import annotations

import math
import os
import wave
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from scalegen.config.schema import OptimConfig
from scalegen.data.transforms import mu_law_encode
from scalegen.dataspec import DataSpec
from scalegen.families.wavenet import WaveNetConfig, WaveNetModel
from scalegen.nets.wavenet import WaveNet

REPO = Path(__file__).resolve().parents[2]


def _fsdd_dir() -> Path | None:
    """FSDD recordings: $SCALEGEN_SHARED (the datasets folder) or ../shared/datasets next to the repo."""
    env = os.environ.get("SCALEGEN_SHARED")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "datasets", REPO.parents[1] / "shared" / "datasets"]
    for path in candidates:
        if (path / "fsdd" / "recordings").is_dir():
            return path / "fsdd" / "recordings"
    return None


@pytest.mark.parametrize("kernel_size,input_kernel,stacks,layers", [(2, 2, 2, 3), (3, 4, 1, 3)])
def test_causality_and_receptive_field_by_gradients(kernel_size, input_kernel, stacks, layers):
    torch.manual_seed(0)
    q, t_len = 8, 48
    net = WaveNet(q, 8, 8, 16, kernel_size, layers, stacks, input_kernel).double()
    r = net.receptive_field
    assert r == input_kernel + (kernel_size - 1) * stacks * (2**layers - 1)  # R = k0 + (k-1) sum(d)
    assert r < t_len - 4
    dep = torch.zeros(t_len, t_len, dtype=torch.bool)
    for _ in range(4):  # union over inputs: a ReLU can hide a dependence at one input point
        x = torch.rand(1, q, t_len, dtype=torch.float64)
        jac = jacobian(lambda v: net.forward_one_hot(v.view(1, q, t_len)).sum(1)[0], x.view(-1))
        dep |= (jac.view(t_len, q, t_len).abs() > 0).any(1)
    for t in range(t_len):
        expected = torch.zeros(t_len, dtype=torch.bool)
        expected[max(0, t - r):t] = True  # exactly x_{t-R} .. x_{t-1}
        assert torch.equal(dep[t], expected), (t, dep[t].nonzero().flatten().tolist())


def test_default_receptive_field():
    net = WaveNet(levels=4, residual_channels=2, dilation_channels=2, skip_channels=2)
    assert net.receptive_field == 2 + 3 * (2**10 - 1)  # 3 stacks of dilations 1..512, k = k0 = 2


@pytest.mark.parametrize("num_classes", [0, 3])
def test_incremental_generation_matches_full_forward(num_classes):
    torch.manual_seed(0)
    net = WaveNet(16, 8, 8, 16, 2, 4, 2, 2, num_classes=num_classes).double().eval()
    codes = torch.randint(0, 16, (3, 40))
    g = torch.tensor([0, 2, -1]) if num_classes else None
    full = net(codes, g)
    state = net.init_state(3, g)
    prev = None
    steps = []
    for t in range(40):
        logits, state = net.step(prev, state)
        steps.append(logits)
        prev = codes[:, t]
    torch.testing.assert_close(torch.stack(steps, 2), full)


def test_exact_nll_equals_sum_of_conditionals_and_float_input_is_mu_law_coded():
    torch.manual_seed(0)
    cfg = WaveNetConfig(levels=16, residual_channels=8, dilation_channels=8, skip_channels=16,
                        layers_per_stack=3, num_stacks=1, condition="label")
    model = WaveNetModel(cfg, OptimConfig(), DataSpec(kind="audio", shape=(1, 20), num_classes=10,
                                                      levels=16, sample_rate=8000)).double().eval()
    audio = torch.rand(2, 1, 20) * 2 - 1
    codes = mu_law_encode(audio, 16)
    y = torch.tensor([3, -1])
    with torch.no_grad():
        nll = model.nll(audio, y)
        torch.testing.assert_close(model.nll(codes, y), nll)
        expected = torch.zeros(2, dtype=torch.float64)
        for t in range(20):
            corrupted = codes.clone()
            corrupted[..., t:] = torch.randint(0, 16, corrupted[..., t:].shape)  # the future must not matter
            logp = torch.log_softmax(model.net(corrupted, y)[:, :, t], 1)
            expected -= logp.gather(1, codes[:, 0, t:t + 1])[:, 0]
    torch.testing.assert_close(nll, expected)


def _fsdd_batches(n_clips: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    fsdd = _fsdd_dir()
    if fsdd is None:
        pytest.skip("FSDD recordings not found (set SCALEGEN_SHARED to the shared datasets folder)")
    files = sorted(fsdd.glob("*_jackson_*.wav"))[:n_clips]
    clips, labels = [], []
    for f in files:
        with wave.open(str(f)) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
        start = max(0, (len(pcm) - length) // 2)  # the middle of the utterance, zero-padded if short
        clip = np.zeros(length, np.float32)
        seg = pcm[start:start + length]
        clip[:len(seg)] = seg
        clips.append(clip)
        labels.append(int(f.name.split("_")[0]))
    return torch.tensor(np.stack(clips)).unsqueeze(1), torch.tensor(labels)


def test_short_fsdd_run_lowers_nll_samples_and_writes_wav(tmp_path):
    torch.manual_seed(0)
    x, y = _fsdd_batches(96, 512)
    cfg = WaveNetConfig(residual_channels=16, dilation_channels=16, skip_channels=32, layers_per_stack=6,
                        num_stacks=1, condition="label", sample_length=64)
    spec = DataSpec(kind="audio", shape=(1, 512), num_classes=10, levels=65536, sample_rate=8000)
    model = WaveNetModel(cfg, OptimConfig(lr=3e-3), spec)
    held_x, held_y = x[80:], y[80:]
    with torch.no_grad():
        before = float(model.nll(held_x, held_y).mean())
    batches = [{"x": x[i:i + 16], "y": y[i:i + 16]} for i in range(0, 80, 16)]
    trainer = L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None, shuffle=True))
    model.eval()
    with torch.no_grad():
        after = float(model.nll(held_x, held_y).mean())
    assert before / (512 * math.log(2)) > 7.5  # ~8 bits/sample at initialization (uniform over 256 codes)
    assert after < before - 0.5 * 512 * math.log(2), (before, after)  # at least 0.5 bit/sample better
    audio = model.sample(2)
    assert audio.shape == (2, 1, 64) and audio.dtype == torch.float32 and audio.abs().max() <= 1
    paths = model.save_wav(audio, tmp_path / "gen.wav")
    assert [p.name for p in paths] == ["gen_000.wav", "gen_001.wav"]
    with wave.open(str(paths[0])) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 8000, 64)
        pcm = np.frombuffer(w.readframes(64), dtype="<i2")
    np.testing.assert_allclose(pcm / 32767, audio[0, 0].numpy(), atol=1 / 32767)


def test_bf16_autocast_loss_matches_float32():
    torch.manual_seed(0)
    cfg = WaveNetConfig(residual_channels=8, dilation_channels=8, skip_channels=16, layers_per_stack=4,
                        num_stacks=1)
    model = WaveNetModel(cfg, OptimConfig(), DataSpec(kind="audio", shape=(1, 200), sample_rate=8000))
    x = (torch.rand(4, 1, 200) * 2 - 1) ** 3
    ref, _ = model.loss({"x": x})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = model.loss({"x": x})
    assert low.dtype == torch.float32
    assert abs(float(low) - float(ref)) < 0.02, (float(low), float(ref))
    low.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
