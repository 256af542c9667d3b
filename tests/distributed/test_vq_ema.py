"""VQ-VAE codebook under data parallelism (issue 15: "EMA updates move each code to the mean of its assigned
vectors", on every rank): 2 gloo processes each quantize their half of every global batch; the assignment
counts and sums are all-reduced before the EMA update, so both ranks hold the same codebook, equal to one
process's on the concatenated batches; dead-code restarts (rank 0's picks, broadcast) keep them identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import digit_batches, launch
from vq_ema_worker import MICRO, STEPS, vq_model

from scalegen.dataspec import images_to_unit


@pytest.mark.slow
def test_two_ranks_hold_the_codebook_of_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    launch("vq_ema_worker.py", str(tmp_path))
    states = {name: [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(2)] for name in ("ema", "restarts")}
    for name, (a, b) in states.items():
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bitwise, across ranks
    # Independently, in one process: the same encoder on the two halves of every global batch together,
    # nearest codes by brute force, per-code counts and sums by masks, and the EMA recursion of the
    # paper's Appendix A.1 with Laplace smoothing (decay 0.8, eps 1e-5; N_k starts at 1, m_k at e_k).
    model = vq_model("ema")
    d, eps, k_codes = 0.8, 1e-5, 16
    codebook = model.quantizer.codebook.clone()
    n_run, m_run = torch.ones(k_codes), codebook.clone()
    with torch.no_grad():
        for batch in digit_batches(0, 1, 2 * MICRO, STEPS):
            z = model.encoder(images_to_unit(batch["x"])).permute(0, 2, 3, 1).reshape(-1, 4)
            nearest = ((z[:, None] - codebook[None]) ** 2).sum(-1).argmin(1)
            n = torch.stack([(nearest == k).sum() for k in range(k_codes)]).float()
            s = torch.stack([z[nearest == k].sum(0) for k in range(k_codes)])
            n_run, m_run = d * n_run + (1 - d) * n, d * m_run + (1 - d) * s
            total = n_run.sum()
            codebook = m_run / ((n_run + eps) / (total + k_codes * eps) * total)[:, None]
    ddp = states["ema"][0]
    assert not torch.allclose(ddp["codebook"], model.quantizer.codebook)  # it moved: the comparison says something
    torch.testing.assert_close(ddp["codebook"], codebook, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["count"], n_run, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["ema_sum"], m_run, rtol=1e-5, atol=1e-6)
    # Each rank alone would have moved differently: the all-reduce is what makes them agree.
    half = vq_model("ema")
    with torch.no_grad():
        for batch in digit_batches(0, 2, MICRO, STEPS):
            half.loss(batch)
    assert not torch.allclose(half.quantizer.codebook, ddp["codebook"], atol=1e-4)
