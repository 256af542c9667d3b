"""A prepared check of scalegen on the GPU it finds: one command, a markdown table and JSON.

    python benchmarks/gpu_check.py OUT_DIR [--peak-tflops T] [--skip unet,strategies,inception,syncs]
    python benchmarks/gpu_check.py OUT_DIR --device cpu --tiny        # CI: tiny sizes, < 2 minutes

Writes OUT_DIR/gpu_check.md and OUT_DIR/gpu_check.json; exits 1 when a check fails (a skipped one,
e.g. DeepSpeed not installed, does not fail). What it measures:

1. unet: the DDPM CIFAR-10 UNet of recipes/ddpm/cifar10.yaml (35.7M parameters) training at the
   recipe's batch (128) in bf16-mixed (autocast): images/s eager and with torch.compile (scalegen's
   `trainer.compile` hook, `compile_networks`), the FLOPs of one training step counted with
   `torch.utils.flop_counter.FlopCounterMode`, and the model FLOPs utilization against the device's
   dense bf16 peak (PEAK_BF16_TFLOPS, or --peak-tflops).
2. strategies: `scalegen.runtime.train(cfg)` on recipes/ddpm/tiny.yaml (with its EMA) for 20 steps in
   fp32 under ddp, deepspeed_stage_2, deepspeed_stage_3 and fsdp on one device, each in its own process;
   each run's per-step losses equal DDP's (LOSS_RTOL), its last checkpoint is read back by
   `scalegen.runtime.load_model` (raw and EMA weights) and both equal DDP's (WEIGHT_RTOL), and the EMA
   differs from the raw weights (it is really there). Each run also reports the host-device syncs of its
   quiet steps (those the loggers do not write on) through the whole Trainer, from one batch's start to
   the next's (reported, expected 0; the UNet step alone is check 4).
3. inception: FID InceptionV3 features/s at batch 256 in fp32 (PyTorch's defaults: cuDNN may use TF32)
   and under bf16 autocast, NCHW and channels-last (seeded random weights: the arithmetic of the real
   ones), and the relative difference of the bf16 and of the channels-last features.
4. syncs: host-device synchronizations in one training step of the UNet (eager, bf16-mixed), counted
   twice: CUDA's own (`torch.cuda.set_sync_debug_mode("warn")`) and tensor-to-Python reads
   (`aten._local_scalar_dense`, which .item(), bool(t), float(t) and .tolist() dispatch to). Expected 0.

`--tiny` shrinks every size (the tiny recipe's UNet at batch 8, 5 strategy steps, Inception at batch 1)
and on CPU compiles with dynamo's `eager` backend (tracing without inductor's C++ code generation,
which alone takes minutes on a small CPU); DeepSpeed and FSDP then skip (Lightning runs them on CUDA only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets; the first name
# contained in torch.cuda.get_device_name() wins (so "H100 PCIe" comes before "H100").
PEAK_BF16_TFLOPS = [
    ("H200", 989.0),  # H200 SXM
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # H100 SXM
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),  # AWS's A10G (lower clocks than the A10)
    ("A10", 125.0),
]
STRATEGIES = ("ddp", "deepspeed_stage_2", "deepspeed_stage_3", "fsdp")
# fp32 runs do the same arithmetic up to summation order and cuDNN's non-deterministic kernels (~1e-7
# relative per step); Adam's normalized updates let that grow over 20 steps, far below these bounds.
LOSS_RTOL = 1e-3
WEIGHT_RTOL = 1e-3  # on ||w - w_ddp|| / ||w_ddp|| over all weights


def sizes(tiny: bool) -> dict[str, Any]:
    if tiny:
        return {"recipe": "ddpm/tiny", "shape": (1, 8, 8), "batch": 8, "steps": 3, "warmup": 1,
                "strategy_steps": 5, "inception_batch": 1, "inception_iters": 1}
    return {"recipe": "ddpm/cifar10", "shape": (3, 32, 32), "batch": 128, "steps": 30, "warmup": 5,
            "strategy_steps": 20, "inception_batch": 256, "inception_iters": 10}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, flag: float | None) -> tuple[float | None, str]:
    if flag:
        return flag, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown for CPUs (give --peak-tflops)"
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> tuple[float | None, str]:
    """The table's dense bf16 peak for a CUDA device name, and where it came from."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak, f"table entry {key!r}"
    return None, f"{name!r} is not in the table (give --peak-tflops)"


# ---- 1. the UNet's training speed ---------------------------------------------------------------
def unet_model(size: dict, device: torch.device) -> Any:
    import scalegen.families  # noqa: F401  (registers the built-in families)
    from scalegen.config import load_config
    from scalegen.dataspec import DataSpec
    from scalegen.registry import get_family

    cfg = load_config(size["recipe"], [])
    torch.manual_seed(0)
    spec = DataSpec(kind="image", shape=size["shape"], num_classes=10)
    return get_family("diffusion").module(cfg.model, cfg.optim, spec).to(device).train()


def train_step_fn(model: Any, device: torch.device, batch_size: int, shape: tuple[int, ...]):
    """One bf16-mixed training step of the family (loss, backward, optimizer) on a fixed random batch."""
    from scalegen.optim import make_optimizer

    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randint(0, 256, (batch_size, *shape), dtype=torch.uint8, generator=g).to(device),
             "y": torch.randint(0, 10, (batch_size,), generator=g).to(device)}
    opt = make_optimizer(model.parameters(), model.optim_cfg)  # the recipe's Adam, as training builds it

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def images_per_second(step, device: torch.device, size: dict) -> float:
    for _ in range(size["warmup"]):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(size["steps"]):
        step()
    synchronize(device)
    return size["batch"] * size["steps"] / (time.perf_counter() - start)


def check_unet(device: torch.device, size: dict, args: argparse.Namespace) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from scalegen.callbacks.compile import compile_networks

    model = unet_model(size, device)
    params = sum(p.numel() for p in model.net.parameters())
    step = train_step_fn(model, device, size["batch"], size["shape"])
    step()  # allocations and cuDNN's choices outside the count
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    eager = images_per_second(step, device, size)

    model = unet_model(size, device)
    compile_networks(model, "default", backend=args.compile_backend)
    step = train_step_fn(model, device, size["batch"], size["shape"])
    start = time.perf_counter()
    step()
    synchronize(device)
    compile_s = time.perf_counter() - start
    compiled = images_per_second(step, device, size)

    peak, source = peak_tflops(device, args.peak_tflops)
    flops_per_image = flops / size["batch"]

    def mfu(ips: float) -> float | None:
        return None if peak is None else ips * flops_per_image / (peak * 1e12)

    return {
        "recipe": size["recipe"], "parameters": params, "batch": size["batch"], "precision": "bf16-mixed",
        "train_flops_per_image": flops_per_image, "eager_images_per_s": eager, "compiled_images_per_s": compiled,
        "compile_backend": args.compile_backend, "compile_seconds": compile_s, "speedup": compiled / eager,
        "peak_bf16_tflops": peak, "peak_source": source, "mfu_eager": mfu(eager), "mfu_compiled": mfu(compiled),
        "ok": math.isfinite(eager) and math.isfinite(compiled),
    }


# ---- 2. strategies through scalegen's own runtime -------------------------------------------------
class SyncWindow:
    """Host-device syncs between `start` and `stop`: on CUDA what `torch.cuda.set_sync_debug_mode("warn")`
    reports; on a CPU, tensor reads into Python (each would be one on a GPU)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def start(self) -> None:
        if self.device == "cuda":
            self.caught = warnings.catch_warnings(record=True)
            self.log = self.caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self.reads = _scalar_reads("cpu")
            self.reads.__enter__()

    def stop(self) -> list[str]:
        if self.device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self.caught.__exit__(None, None, None)
            return [str(w.message) for w in self.log if "synchroniz" in str(w.message)]
        self.reads.__exit__(None, None, None)
        return self.reads.where


def strategy_run(name: str, out: Path, device: str, steps: int) -> None:
    """In a child process: one `train(cfg)` of the tiny recipe; writes its per-step losses."""
    import lightning as L

    from scalegen.config import load_config
    from scalegen.runtime.train import train

    class Losses(L.Callback):
        """The per-step losses, and the syncs of the quiet steps (no logging) through the whole Trainer: from
        a batch's start to the next's, Lightning's own work after the batch included."""

        def __init__(self) -> None:
            self.values: list[torch.Tensor] = []
            self.window: SyncWindow | None = None
            self.epoch, self.quiet_steps, self.syncs = -1, 0, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.window is not None:
                found = self.window.stop()
                if trainer.current_epoch == self.epoch:  # an epoch's end is a step on which the loggers write
                    self.quiet_steps += 1
                    self.syncs += found
                self.window = None
            if 2 <= trainer.global_step <= steps - 2:  # step 0 and the last log
                self.window, self.epoch = SyncWindow(device), trainer.current_epoch
                self.window.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.values.append(loss.detach().float().clone())

    cfg = load_config("ddpm/tiny", [
        f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", "trainer.devices=1",
        f"trainer.strategy={name}", "trainer.precision=32-true", f"trainer.max_steps={steps}",
        "trainer.max_epochs=null", "trainer.limit_val_batches=0", "checkpoint.every_n_epochs=null",
        "trainer.progress_bar=false", "logging.wandb=false", "trainer.resume=never", "trainer.log_every_n_steps=50",
        f"run.dir={out / 'runs'}", f"run.name={name}",
    ])
    losses = Losses()
    start = time.perf_counter()
    train(cfg, callbacks=[losses])
    result = {"losses": [float(v) for v in losses.values], "seconds": time.perf_counter() - start,
              "quiet_steps": losses.quiet_steps, "syncs_per_quiet_step": len(losses.syncs) / max(1, losses.quiet_steps),
              "first_syncs": losses.syncs[:5]}
    (out / f"{name}.json").write_text(json.dumps(result))


def _relative_difference(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b if b[k].is_floating_point())
    den = sum(float(b[k].double().pow(2).sum()) for k in b if b[k].is_floating_point())
    return math.sqrt(num / den)


def check_strategies(device: torch.device, size: dict, out: Path) -> dict:
    from scalegen.runtime import load_model

    work = out / "strategies"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name in STRATEGIES:
        if name != "ddp" and device.type != "cuda":
            results[name] = {"skipped": "Lightning runs DeepSpeed and FSDP on CUDA only"}
            continue
        if name.startswith("deepspeed") and not _importable("deepspeed"):
            results[name] = {"skipped": "deepspeed is not installed"}
            continue
        cmd = [sys.executable, __file__, str(out), "--strategy-run", name, "--device", device.type,
               "--steps", str(size["strategy_steps"])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode != 0:
            results[name] = {"ok": False, "error": (proc.stderr or proc.stdout)[-3000:]}
            continue
        results[name] = json.loads((work / f"{name}.json").read_text())
        raw, _ = load_model(work / "runs" / name, use_ema=False)
        ema, _ = load_model(work / "runs" / name, use_ema=True)
        results[name]["weights"] = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
        results[name]["ema"] = {k: v.detach().cpu() for k, v in ema.state_dict().items()}
    ddp = results.get("ddp", {})
    for name, r in results.items():
        if "losses" not in r:
            continue
        r["loaded"] = True  # load_model read the checkpoint back (it raises otherwise)
        r["ema_vs_raw"] = _relative_difference(r["ema"], r["weights"])
        checks = [len(r["losses"]) == size["strategy_steps"], r["ema_vs_raw"] > 1e-4]
        if name != "ddp" and "losses" in ddp:
            r["max_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ddp["losses"]))
            r["weights_rel_diff"] = _relative_difference(r["weights"], ddp["weights"])
            r["ema_rel_diff"] = _relative_difference(r["ema"], ddp["ema"])
            checks += [r["max_loss_rel_diff"] <= LOSS_RTOL, r["weights_rel_diff"] <= WEIGHT_RTOL,
                       r["ema_rel_diff"] <= WEIGHT_RTOL]
        r["ok"] = all(checks)
    for r in results.values():
        r.pop("weights", None)
        r.pop("ema", None)
    return {"runs": results, "loss_rtol": LOSS_RTOL, "weight_rtol": WEIGHT_RTOL,
            "ok": all(r.get("ok", True) for r in results.values()) and bool(ddp.get("ok"))}


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---- 3. Inception features/s --------------------------------------------------------------------
def check_inception(device: torch.device, size: dict) -> dict:
    from eval_throughput import random_inception

    net = random_inception(device)
    b = size["inception_batch"]
    images = torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    out: dict[str, Any] = {"batch": b, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    feats = {}
    with torch.no_grad():
        for layout in ("contiguous", "channels_last"):
            for precision in ("fp32", "bf16"):
                net.set_speed(layout == "channels_last", precision)
                label = f"{precision}_{layout}" if layout == "channels_last" else precision
                feats[label] = net(images)[0]  # warm-up, and the features compared below
                synchronize(device)
                start = time.perf_counter()
                for _ in range(size["inception_iters"]):
                    net(images)
                synchronize(device)
                out[f"{label}_images_per_s"] = b * size["inception_iters"] / (time.perf_counter() - start)
    out["bf16_feature_rel_diff"] = float((feats["bf16"] - feats["fp32"]).norm() / feats["fp32"].norm())
    out["channels_last_feature_rel_diff"] = float(
        (feats["fp32_channels_last"] - feats["fp32"]).norm() / feats["fp32"].norm())
    out["ok"] = all(math.isfinite(v) for k, v in out.items() if k.endswith("_images_per_s"))
    return out


# ---- 4. host-device syncs in a training step --------------------------------------------------------
def _scalar_reads(device_type: str) -> Any:
    """A dispatch mode counting reads of a tensor on `device_type` into Python (`.item()`, `bool(t)`, ...: on
    a GPU each one waits for the device); `where` holds the first few stacks."""
    from torch.utils._python_dispatch import TorchDispatchMode  # documented for __torch_dispatch__ modes

    class ScalarReads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0
            self.where: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == device_type:
                self.count += 1
                if len(self.where) < 5:
                    self.where.append("".join(traceback.format_stack(limit=4)[:-1]))
            return func(*args, **(kwargs or {}))

    return ScalarReads()


def check_syncs(device: torch.device, size: dict) -> dict:
    model = unet_model(size, device)
    step = train_step_fn(model, device, size["batch"], size["shape"])
    step()  # the first step allocates the optimizer state
    steps = 3
    reads = _scalar_reads(device.type)
    with reads:
        for _ in range(steps):
            step()
    out: dict[str, Any] = {"steps": steps, "scalar_reads_per_step": reads.count / steps, "first_reads": reads.where}
    if device.type == "cuda":
        synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        out["cuda_syncs_per_step"] = len(syncs) / steps
        out["first_syncs"] = syncs[:5]
    out["ok"] = out["scalar_reads_per_step"] == 0 and out.get("cuda_syncs_per_step", 0) == 0
    return out


# ---- report ---------------------------------------------------------------------------------------
def _f(v: Any, fmt: str = "{:.3g}") -> str:
    return "n/a" if v is None else fmt.format(v)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# gpu_check: {env['device_name']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, lightning {env['lightning']}, deepspeed {env['deepspeed']}; "
             f"{report['seconds']:.0f} s{' (--tiny)' if report['tiny'] else ''}.", "",
             "| check | result | status |", "| --- | --- | --- |"]

    def status(r: dict) -> str:
        return "skipped" if "skipped" in r else ("ok" if r.get("ok") else "FAIL")

    c = report["checks"]
    if "unet" in c:
        u = c["unet"]
        if "error" in u or "skipped" in u:
            lines.append(f"| UNet training | {u.get('error', u.get('skipped', ''))[:200]} | {status(u)} |")
        else:
            lines.append(
                f"| UNet ({u['recipe']}, {u['parameters'] / 1e6:.1f}M params, batch {u['batch']}, bf16-mixed) "
                f"| eager {u['eager_images_per_s']:.1f} img/s (MFU {_f(u['mfu_eager'], '{:.1%}')}), compiled "
                f"{u['compiled_images_per_s']:.1f} img/s (MFU {_f(u['mfu_compiled'], '{:.1%}')}, x{u['speedup']:.2f}, "
                f"compile {u['compile_seconds']:.0f} s, {u['compile_backend']}); "
                f"{u['train_flops_per_image'] / 1e9:.2f} GFLOP/image/step; peak {_f(u['peak_bf16_tflops'])} "
                f"TFLOP/s ({u['peak_source']}) | {status(u)} |")
    if "strategies" in c:
        s = c["strategies"]
        for name, r in s.get("runs", {}).items():
            if "skipped" in r:
                text = r["skipped"]
            elif "error" in r:
                text = "error: " + r["error"].strip().splitlines()[-1][:200]
            else:
                text = (f"{len(r['losses'])} steps in {r['seconds']:.0f} s; checkpoint loaded; EMA vs raw "
                        f"{r['ema_vs_raw']:.2e}; {r['syncs_per_quiet_step']:g} syncs per quiet step "
                        f"({r['quiet_steps']} counted)")
                if "max_loss_rel_diff" in r:
                    text += (f"; vs DDP: loss {r['max_loss_rel_diff']:.1e}, weights {r['weights_rel_diff']:.1e}, "
                             f"EMA {r['ema_rel_diff']:.1e} (tolerance {s['loss_rtol']:g})")
            lines.append(f"| {name} (train(cfg), ddpm/tiny, fp32) | {text} | {status(r)} |")
        if "error" in s:
            lines.append(f"| strategies | {s['error'][:200]} | FAIL |")
    if "inception" in c:
        i = c["inception"]
        text = i.get("error", "")[:200] or (
            f"at batch {i['batch']}, NCHW: fp32 {i['fp32_images_per_s']:.1f} img/s, bf16 {i['bf16_images_per_s']:.1f}; "
            f"channels-last: fp32 {i['fp32_channels_last_images_per_s']:.1f}, bf16 "
            f"{i['bf16_channels_last_images_per_s']:.1f}; features differ by {i['bf16_feature_rel_diff']:.1e} (bf16), "
            f"{i['channels_last_feature_rel_diff']:.1e} (channels-last)")
        lines.append(f"| Inception features/s | {text} | {status(i)} |")
    if "syncs" in c:
        y = c["syncs"]
        text = y.get("error", "")[:200] or (
            f"{y['scalar_reads_per_step']:g} tensor-to-Python reads per step"
            + (f", {y['cuda_syncs_per_step']:g} CUDA syncs per step" if "cuda_syncs_per_step" in y else ""))
        lines.append(f"| host-device syncs per training step | {text} | {status(y)} |")
    return "\n".join(lines) + "\n"


def environment(device: torch.device) -> dict:
    import lightning

    try:
        import deepspeed

        ds = deepspeed.__version__
    except Exception:  # not installed, or its import fails without CUDA tooling
        ds = "not installed"
    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "lightning": lightning.__version__,
        "deepspeed": ds, "threads": torch.get_num_threads(), "python": platform.python_version(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for gpu_check.md and gpu_check.json")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; "
                   "eager with --tiny on CPU)")
    p.add_argument("--skip", default="", help="comma-separated checks to leave out: unet,strategies,inception,syncs")
    p.add_argument("--strategy-run", default=None, help=argparse.SUPPRESS)  # internal: one child run
    p.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    if args.strategy_run:
        strategy_run(args.strategy_run, out / "strategies", args.device, args.steps)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --device cpu --tiny for the CPU path", file=sys.stderr)
        return 2
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.tiny and args.device == "cpu" else "inductor"
    os.environ.setdefault("SCALEGEN_DATA", str(Path(tempfile.gettempdir()) / "scalegen-gpu-check-data"))
    os.environ.setdefault("WANDB_MODE", "disabled")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    size = sizes(args.tiny)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    start = time.perf_counter()
    checks: dict[str, dict] = {}
    for name, fn in (("unet", lambda: check_unet(device, size, args)),
                     ("strategies", lambda: check_strategies(device, size, out)),
                     ("inception", lambda: check_inception(device, size)),
                     ("syncs", lambda: check_syncs(device, size))):
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            checks[name] = fn()
        except Exception as e:  # one broken check must not hide the others' results
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        checks[name]["seconds"] = time.perf_counter() - t0
        print(f"gpu_check: {name} done in {checks[name]['seconds']:.0f} s", flush=True)
    report = {"environment": environment(device), "tiny": args.tiny, "device": args.device, "checks": checks,
              "seconds": time.perf_counter() - start}
    report["ok"] = all(c.get("ok", False) for c in checks.values())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
