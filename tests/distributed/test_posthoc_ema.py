"""Post-hoc EMA (EDM2 sec. 3) end to end: power-function EMAs kept by real Lightning Trainers, snapshots,
the reconstruction of a profile that was also tracked directly, one process against two (gloo DDP), resume,
the averages sliced across ZeRO-3 ranks (their shards, reconstruction, refusal of an incomplete set, resume),
and `scalegen ema` (one width; a sweep picked by a metric; bad input) feeding `eval`, `sample`, `release`.

Tolerance of the reconstruction. The reconstruction is sum_k x_k snapshot_k with sum_k x_k = 1, so its
difference from the directly tracked average is exactly sum_i e_i theta_i, e_i the difference of the
per-step weights (from `scalegen.ema_profiles`; checked to 1e-6), hence at most
||e||_1 max_i ||theta_i - theta_T||. With 12 snapshots of each of sigma_rel 0.05 and 0.10, sigma_rel 0.07
at the last step has profile error 0.65% and ||e||_1 = 0.24%; measured, ||rec - direct|| is 0.12% of
||ema_0.05 - ema_0.10|| (how far apart the two tracked averages are); the test allows 1%.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from dist_helpers import launch

from scalegen.callbacks.ema import update_averages
from scalegen.callbacks.posthoc_ema import PostHocEMA, list_snapshots, reconstruct
from scalegen.checkpoints import load_model, read_checkpoint
from scalegen.cli.main import main
from scalegen.ema_profiles import discrete_weights, sigma_rel_to_gamma
from scalegen.errors import UserError

STEPS, EVERY = 24, 2


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.double().flatten() for k, v in sorted(state.items()) if v.is_floating_point()])


def closed_form_state(trajectory: dict[int, dict], sigma_rel: float, step: int) -> dict[str, torch.Tensor]:
    """The power-function EMA at `step` as its per-step weights times the recorded weights, keyed like them."""
    w = discrete_weights(step, sigma_rel_to_gamma(sigma_rel))
    return {k: sum(float(w[i - 1]) * trajectory[i][k].double() for i in range(1, step + 1)).float()
            if v.is_floating_point() else v for k, v in trajectory[step].items()}


def closed_form(trajectory: dict[int, dict], sigma_rel: float, step: int) -> torch.Tensor:
    w = discrete_weights(step, sigma_rel_to_gamma(sigma_rel))
    return sum(float(w[i - 1]) * flat(trajectory[i]) for i in range(1, step + 1))


def joined(slices: list[dict[str, torch.Tensor]], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ranks' slices of each flattened tensor concatenated in rank order, in the shapes of `like`."""
    return {k: torch.cat([s[k].reshape(-1) for s in slices]).reshape(v.shape) for k, v in like.items()}


def weight_error(folder, info: dict, steps: int, sigma_rel: float) -> np.ndarray:
    """Per-step weights of a reconstruction (its coefficients times the snapshots' profiles) minus the target's."""
    pairs = zip(list_snapshots(folder), [c for _, _, c in info["snapshots"]])
    weights = sum(c * discrete_weights(e["step"], e["gamma"], steps) for e, c in pairs)
    return weights - discrete_weights(steps, sigma_rel_to_gamma(sigma_rel))


def worker(out, *args: str, nproc: int = 1) -> dict:
    launch("posthoc_worker.py", "--out", str(out), "--batches", "12", *args, nproc=nproc)
    return torch.load(out / "rank0.pt", weights_only=True)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    return out, worker(out, "--steps", str(STEPS), "--every", str(EVERY))


def test_reconstruction_matches_the_ema_tracked_directly(one):
    out, r = one
    traj = r["trajectory"]
    assert sorted(traj) == list(range(1, STEPS + 1))
    files = sorted(p.name for p in (out / "snapshots").iterdir())
    assert files == [f"step-{s:09d}.pt" for s in range(EVERY, STEPS + 1, EVERY)]  # no temporaries left
    entries = list_snapshots(out / "snapshots")
    assert [(e["step"], e["sigma_rel"]) for e in entries[:2]] == [(2, 0.05), (2, 0.10)]
    assert all(e["gamma"] == pytest.approx(sigma_rel_to_gamma(e["sigma_rel"])) for e in entries)
    # The averages kept in training are the power-function EMAs of the recorded weights.
    direct = flat(r["direct"])
    torch.testing.assert_close(direct, closed_form(traj, 0.07, STEPS), rtol=0, atol=1e-6)
    for sigma, avg in zip((0.05, 0.10), r["posthoc"]):
        torch.testing.assert_close(flat(avg), closed_form(traj, sigma, STEPS), rtol=0, atol=1e-6)
    direct_file = torch.load(out / "direct" / f"step-{STEPS:09d}.pt", weights_only=True)  # written at the end
    assert torch.equal(flat(direct_file["profiles"][0]["state_dict"]), direct)

    rec, info = reconstruct(out / "snapshots", 0.07)
    assert info["step"] == STEPS and info["profile_error"] < 0.01
    assert sum(c for _, _, c in info["snapshots"]) == pytest.approx(1.0, abs=1e-9)
    # Its error is exactly what the per-step weights predict ...
    e = weight_error(out / "snapshots", info, STEPS, 0.07)
    predicted = sum(float(e[i - 1]) * flat(traj[i]) for i in range(1, STEPS + 1))
    error = flat(rec) - direct
    torch.testing.assert_close(error, predicted, rtol=0, atol=1e-6)
    # ... within the bound ||e||_1 max_i ||theta_i - theta_T|| and a small fraction of the profiles' spread.
    spread = max(float((flat(traj[i]) - flat(traj[STEPS])).norm()) for i in traj)
    assert float(error.norm()) <= np.abs(e).sum() * spread + 1e-6
    assert float(error.norm()) < 0.01 * float((flat(r["posthoc"][0]) - flat(r["posthoc"][1])).norm())
    assert float(error.norm()) < 0.05 * float((direct - flat(traj[STEPS])).norm())


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    return out, worker(out, "--steps", str(STEPS), "--every", str(EVERY), nproc=2)


@pytest.mark.slow  # a 2-process Lightning launch: ~40 s on 2 cores
def test_ddp_writes_each_snapshot_once_and_reconstructs_like_one_process(one, two):
    (out1, r1), (out2, r2) = one, two
    names = [sorted(p.name for p in (out / "snapshots").iterdir()) for out in (out1, out2)]
    assert names[1] == names[0]  # rank 0 wrote each snapshot once, nothing else (no rank-1 copies, no temporaries)
    other = torch.load(out2 / "rank1.pt", weights_only=True)
    for a, b in zip(r2["posthoc"], other["posthoc"]):
        assert all(torch.equal(a[k], b[k]) for k in a)  # every rank keeps the same averages
    # The same global batches: the two runs differ by summation order only.
    torch.testing.assert_close(flat(r2["trajectory"][STEPS]), flat(r1["trajectory"][STEPS]), rtol=0, atol=1e-5)
    rec1, _ = reconstruct(out1 / "snapshots", 0.07)
    rec2, _ = reconstruct(out2 / "snapshots", 0.07)
    torch.testing.assert_close(flat(rec2), flat(rec1), rtol=0, atol=1e-5)


@pytest.mark.slow  # two Lightning launches: ~50 s on 2 cores
def test_resume_continues_the_same_averages(tmp_path):
    half = worker(tmp_path, "--steps", str(STEPS // 2), "--every", str(EVERY))
    resumed = worker(tmp_path / "resumed", "--steps", str(STEPS), "--every", str(EVERY),
                     "--resume-from", str(tmp_path / "final.ckpt"))
    assert sorted(resumed["trajectory"]) == list(range(STEPS // 2 + 1, STEPS + 1))  # steps 13..24 only
    assert resumed["num_updates"] == [STEPS, STEPS]
    traj = {**half["trajectory"], **resumed["trajectory"]}
    # The averages after the resume are those of the whole trajectory: the checkpoint carried them.
    torch.testing.assert_close(flat(resumed["direct"]), closed_form(traj, 0.07, STEPS), rtol=0, atol=1e-6)
    for sigma, avg in zip((0.05, 0.10), resumed["posthoc"]):
        torch.testing.assert_close(flat(avg), closed_form(traj, sigma, STEPS), rtol=0, atol=1e-6)
    # They started from the checkpoint's averages, not from the weights at the resume.
    for saved, start in zip(half["posthoc"], resumed["at_start"]):
        assert all(torch.equal(saved[k], start[k]) for k in saved)
        assert float((flat(start) - flat(traj[STEPS // 2])).norm()) > 1e-2


def test_shards_reconstruct_exactly_like_whole_snapshots_and_an_incomplete_set_is_refused(tmp_path):
    """The ZeRO-3 layout on one process: the ranks' states are given the split `init_from` gives them under
    ZeRO-3 (rank r of 2), and see the same weights, as every rank does inside the gather."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5))  # odd sizes; an integer counter
    whole = PostHocEMA(tmp_path / "whole", [0.05, 0.10], every_n_steps=2)
    ranks = [PostHocEMA(tmp_path / "shards", [0.05, 0.10], every_n_steps=2) for _ in range(2)]
    for r, callback in enumerate([whole, *ranks]):
        callback.start(net)
        for st in callback.states if r else ():
            st.split = (r - 1, 2)
            st.shadow = {k: st.part(v).clone() for k, v in st.shadow.items()}
    for step in range(1, 9):
        net.load_state_dict({k: torch.randn(v.shape) if v.is_floating_point() else torch.tensor(step)
                             for k, v in net.state_dict().items()})
        for r, callback in enumerate([whole, *ranks]):
            update_averages(callback.states, net, step)
            if step % 2 == 0:
                callback.write_snapshot(step, global_zero=r <= 1)
    held = [sum(v.numel() for v in cb.states[0].shadow.values()) for cb in ranks]
    n = {k: v.numel() for k, v in net.state_dict().items()}
    assert held == [sum((m + 1) // 2 for m in n.values()), sum(m // 2 for m in n.values())]  # 24 and 17 of 41
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        f"step-{s:09d}.rank-{r:03d}-of-002.pt" for s in range(2, 9, 2) for r in range(2)]
    assert [e["files"] for e in list_snapshots(tmp_path / "shards")][-1] == [
        tmp_path / "shards" / f"step-000000008.rank-{r:03d}-of-002.pt" for r in range(2)]
    expected, _ = reconstruct(tmp_path / "whole", 0.07)
    rec, _ = reconstruct(tmp_path / "shards", 0.07)
    assert list(rec) == list(expected) and int(rec["1.num_batches_tracked"]) == 8
    assert all(rec[k].shape == v.shape and torch.equal(rec[k], v) for k, v in expected.items())  # same sums
    (tmp_path / "shards" / "step-000000004.rank-001-of-002.pt").unlink()
    with pytest.raises(UserError, match="snapshot 4 .* incomplete .* missing step-000000004.rank-001-of-002.pt") as e:
        reconstruct(tmp_path / "shards", 0.07)
    assert "\n" not in str(e.value)


# ---- the command line --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory, train_recipe):
    run = tmp_path_factory.mktemp("runs") / "vae-posthoc"
    return train_recipe("vae/tiny", run, "ema.posthoc.enabled=true", "ema.posthoc.snapshot_every_n_steps=4")


def test_ema_command_writes_a_checkpoint_that_eval_sample_and_release_take(posthoc_run, tmp_path, capsys):
    out = tmp_path / "ema-0.07.ckpt"
    assert main(["ema", str(posthoc_run), "--sigma-rel", "0.07", "--out", str(out)]) == 0
    expected, _ = reconstruct(posthoc_run / "ema_snapshots", 0.07)
    ckpt = read_checkpoint(out)
    assert ckpt["posthoc_ema"]["sigma_rel"] == 0.07 and "ema_state_dict" not in ckpt
    model, cfg = load_model(out)
    assert cfg.model.family == "vae" and cfg.ema.posthoc.enabled
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    again = tmp_path / "from-the-checkpoint.ckpt"  # a checkpoint of the run names the run too
    last = posthoc_run / "checkpoints" / "last.ckpt"
    assert main(["ema", str(last), "--sigma-rel", "0.07", "--out", str(again)]) == 0
    assert all(torch.equal(read_checkpoint(again)["state_dict"][k], v) for k, v in expected.items())
    assert main(["eval", str(out), "--out", str(tmp_path / "eval"), "--metrics", "bpd", "--no-wandb",
                 "eval.iwae_k=1"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert np.isfinite(metrics["metrics"]["bpd"]["value"])
    assert main(["sample", str(out), "--n", "4", "--out", str(tmp_path / "grid.png")]) == 0
    assert main(["release", str(out), "--out", str(tmp_path / "release")]) == 0
    assert (tmp_path / "release" / "model.safetensors").is_file()


def test_a_sweep_picks_the_best_width_by_the_metric(posthoc_run, tmp_path, capsys):
    out = tmp_path / "best.ckpt"
    assert main(["ema", str(posthoc_run), "--sigma-rel", "0.05:0.15:3", "--metric", "bpd", "--out", str(out),
                 "eval.iwae_k=1", "eval.max_examples=100"]) == 0
    sweep = json.loads((tmp_path / "best-sweep" / "sweep.json").read_text())
    rows = sweep["rows"]
    assert [r["sigma_rel"] for r in rows] == pytest.approx([0.05, 0.10, 0.15]) and sweep["lower_is_better"]
    best = min(rows, key=lambda r: r["bpd"])
    info = read_checkpoint(out)["posthoc_ema"]
    assert info["sigma_rel"] == pytest.approx(best["sigma_rel"])
    for row in rows:  # each row is the report written for that width
        report = tmp_path / "best-sweep" / f"sigma_rel-{row['sigma_rel']:.4f}" / "metrics.json"
        report = json.loads(report.read_text())
        assert report["metrics"]["bpd"]["value"] == pytest.approx(row["bpd"])
    assert "best: sigma_rel" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sigma-rel", "0.001"], "cannot be reconstructed"),
        (["--sigma-rel", "0.5"], "out of range"),
        (["--sigma-rel", "0.2:0.02:3", "--metric", "bpd"], "malformed"),
        (["--sigma-rel", "0.02:0.2:3"], "needs --metric"),
        (["--sigma-rel", "0.07", "--metric", "bdp"], "unknown metric"),
        (["--sigma-rel", "0.07", "--snapshots", "EMPTY"], "no post-hoc EMA snapshots"),
    ],
)
def test_bad_input_is_one_line(posthoc_run, tmp_path, capsys, args, message):
    args = [str(tmp_path) if a == "EMPTY" else a for a in args]
    assert main(["ema", str(posthoc_run), *args, "--out", str(tmp_path / "x.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.ckpt").exists()


@pytest.mark.slow  # a 2-process DeepSpeed launch on CPU: ~1-3 min on 2 shared cores (importing DeepSpeed dominates)
def test_zero3_slices_the_averages_across_ranks_reconstructs_and_resumes(tmp_path):
    steps, half = 12, 6
    launch("posthoc_zero3_worker.py", "--out", str(tmp_path), "--steps", str(steps))
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    traj = r[0]["trajectory"]
    final = traj[steps]
    n = {k: v.numel() for k, v in final.items()}
    per_rank = [sum((m + 1) // 2 for m in n.values()), sum(m // 2 for m in n.values())]  # tensor_split's split
    assert [x["split"] for x in r] == [(0, 2), (1, 2)] and r[0]["shapes"] == {k: tuple(v.shape) for k, v in
                                                                               final.items()}
    for x, count in zip(r, per_rank):  # each rank holds its half of every average, nothing whole
        assert 0.45 < count / sum(n.values()) < 0.55
        for avg in (*x["posthoc"], x["direct"]):
            assert set(avg) == set(final) and sum(v.numel() for v in avg.values()) == count
    posthoc = [joined([x["posthoc"][j] for x in r], final) for j in range(2)]
    direct = joined([x["direct"] for x in r], final)
    for sigma, avg in zip((0.05, 0.10, 0.07), (*posthoc, direct)):
        torch.testing.assert_close(flat(avg), closed_form(traj, sigma, steps), rtol=0, atol=1e-6)

    # Every rank wrote its own shard of each snapshot.
    folder = tmp_path / "snapshots"
    assert sorted(p.name for p in folder.iterdir()) == [
        f"step-{s:09d}.rank-{q:03d}-of-002.pt" for s in range(2, steps + 1, 2) for q in range(2)]
    for q, count in enumerate(per_rank):
        shard = torch.load(folder / f"step-{steps:09d}.rank-{q:03d}-of-002.pt", weights_only=True)
        assert (shard["rank"], shard["world_size"]) == (q, 2)
        assert all(sum(v.numel() for v in p["state_dict"].values()) == count for p in shard["profiles"])
    # The reconstruction from the shards equals the one from whole snapshots made of the closed forms ...
    for s in range(2, steps + 1, 2):
        profiles = [{"sigma_rel": sigma, "gamma": sigma_rel_to_gamma(sigma),
                     "state_dict": closed_form_state(traj, sigma, s)} for sigma in (0.05, 0.10)]
        (tmp_path / "whole").mkdir(exist_ok=True)
        torch.save({"step": s, "profiles": profiles}, tmp_path / "whole" / f"step-{s:09d}.pt")
    rec, info = reconstruct(folder, 0.07)
    from_whole, _ = reconstruct(tmp_path / "whole", 0.07)
    assert all(rec[k].shape == final[k].shape for k in final)
    torch.testing.assert_close(flat(rec), flat(from_whole), rtol=0, atol=1e-6)
    # ... and differs from the directly tracked average by exactly the predicted sum_i e_i theta_i.
    e = weight_error(folder, info, steps, 0.07)
    error = flat(rec) - flat(direct)
    torch.testing.assert_close(error, sum(float(e[i - 1]) * flat(traj[i]) for i in range(1, steps + 1)),
                               rtol=0, atol=1e-6)
    # 6 snapshots of each profile: profile error 2.1%; measured 1.2% of the two averages' distance.
    assert float(error.norm()) < 0.05 * float((flat(posthoc[0]) - flat(posthoc[1])).norm())
    # A set missing one rank's shard is refused, naming it.
    shutil.copytree(folder, tmp_path / "incomplete")
    (tmp_path / "incomplete" / "step-000000006.rank-001-of-002.pt").unlink()
    with pytest.raises(UserError, match="incomplete .* missing step-000000006.rank-001-of-002.pt"):
        reconstruct(tmp_path / "incomplete", 0.07)

    # The checkpoint: DeepSpeed wrote each rank's client state (its own slices) to that rank's file.
    for q, count in enumerate(per_rank):
        states = torch.load(tmp_path / "ckpt" / "checkpoint" / f"zero_pp_rank_{q}_mp_rank_00_model_states.pt",
                            weights_only=True)
        saved = states["posthoc"]
        assert saved["split"] == [q, 2] and all(sum(v.numel() for v in w.values()) == count for w in saved["weights"])
    # Resumed from it, the averages continue: they start at the step-6 averages and end at the closed form
    # over the whole trajectory, as the uninterrupted run's.
    res = [x["resumed"] for x in r]
    assert sorted(res[0]["trajectory"]) == list(range(half + 1, steps + 1)) and res[0]["num_updates"] == [steps] * 3
    whole_traj = {**{i: traj[i] for i in range(1, half + 1)}, **res[0]["trajectory"]}
    for j, sigma in enumerate((0.05, 0.10)):
        start = joined([x["at_start"][j] for x in res], final)
        torch.testing.assert_close(flat(start), closed_form(traj, sigma, half), rtol=0, atol=1e-6)
        torch.testing.assert_close(flat(joined([x["posthoc"][j] for x in res], final)),
                                   closed_form(whole_traj, sigma, steps), rtol=0, atol=1e-6)
    torch.testing.assert_close(flat(joined([x["direct"] for x in res], final)), flat(direct), rtol=0, atol=1e-6)
