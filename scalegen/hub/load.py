"""Fetching releases (local folder, file:// or http(s):// URL; downloaded once, checksum-verified,
cached) and loading their weights into a model for fine-tuning or sampling.

Weights are read with safetensors only: a release never makes this process unpickle anything.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch
from omegaconf import OmegaConf

import scalegen.families  # noqa: F401  (registers the built-in families a release may hold)
from scalegen import fetch
from scalegen.config.loader import config_from_container
from scalegen.dataspec import DataSpec
from scalegen.errors import UserError
from scalegen.hub.checksums import SUMS, read_sums, sha256_file, verify_folder
from scalegen.registry import get_family

EMA_WEIGHTS, WEIGHTS = "model_ema.safetensors", "model.safetensors"


def cache_dir() -> Path:
    """Where downloaded releases live: $SCALEGEN_CACHE/releases, default ~/.cache/scalegen/releases."""
    return fetch.cache_dir("releases")


def _get(url: str, timeout: float = 60) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (http(s) only, checked by caller)
            return r.read()
    except (urllib.error.URLError, OSError) as err:
        raise UserError(f"cannot download {url}: {err}") from None


def fetch_release(source: str | Path, sha256: str | None = None) -> Path:
    """A verified local folder for `source`: a folder, a file:// URL, or an http(s):// URL of a release
    folder (its SHA256SUMS and every file listed in it are downloaded once into the cache).

    `sha256` pins the release: the SHA-256 of its SHA256SUMS file must match."""
    source = str(source)
    scheme = urlparse(source).scheme
    if scheme in ("http", "https"):
        base = source.rstrip("/") + "/"
        sums_bytes = _get(base + SUMS)
        digest = hashlib.sha256(sums_bytes).hexdigest()
        if sha256 and digest != sha256.lower():
            raise UserError(
                f"{base}{SUMS} has sha256 {digest[:16]}..., the recipe pins {sha256[:16]}...: "
                "a different or modified release"
            )
        sums = read_sums(sums_bytes.decode(), base + SUMS)
        target = cache_dir() / digest[:32]
        if (target / ".complete").is_file():
            verify_folder(target)  # a cached copy is re-checked, never trusted blindly
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
        try:
            (tmp / SUMS).write_bytes(sums_bytes)
            for name, expected in sums.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                fetch.download(base + name, tmp / name, expected)
            (tmp / ".complete").write_text(base + "\n")
            try:
                tmp.rename(target)
            except OSError:  # another rank or process finished first: use theirs
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        verify_folder(target)
        return target
    if scheme == "file":
        path = Path(unquote(urlparse(source).path))
    elif (
        scheme in ("", "c", "d") or len(scheme) == 1
    ):  # a plain path (a Windows drive letter is not a scheme)
        path = Path(source).expanduser()
    else:
        raise UserError(
            f"release {source!r}: unsupported scheme {scheme!r} (use a folder, file:// or https://)"
        )
    if not path.is_dir():
        raise UserError(
            f"release {source!r} is not a folder (make one with `scalegen release RUN_DIR --out DIR`)"
        )
    verify_folder(path)
    if sha256 and sha256_file(path / SUMS) != sha256.lower():
        raise UserError(f"{path / SUMS} does not match the pinned finetune.sha256")
    return path


def release_info(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "release.json").read_text())


def release_weights(folder: Path, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, file name) of a verified release: the EMA weights when asked for and present."""
    from safetensors.torch import load_file  # only when reading a release

    name = EMA_WEIGHTS if use_ema and (folder / EMA_WEIGHTS).is_file() else WEIGHTS
    return load_file(str(folder / name), device="cpu"), name


def merge_for_init(
    model_state: dict[str, torch.Tensor],
    release_state: dict[str, torch.Tensor],
    reinit: list[str],
    origin: str,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict to load: the release's tensors, except those matched by a `reinit` glob, which
    keep the model's fresh initialization. Any other difference (shape, missing or extra tensor)
    is an error naming every such tensor. Returns (state, names re-initialized)."""

    def asked(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in reinit)

    problems, reinitialized = [], []
    merged: dict[str, torch.Tensor] = {}
    for name, fresh in model_state.items():
        old = release_state.get(name)
        if asked(
            name
        ):  # named for re-initialization: keep the model's fresh tensor, whatever the release has
            reinitialized.append(name)
            merged[name] = fresh
        elif old is None:
            problems.append(f"{name} {tuple(fresh.shape)} is not in the release")
        elif tuple(old.shape) != tuple(fresh.shape):
            problems.append(f"{name}: release {tuple(old.shape)} vs model {tuple(fresh.shape)}")
        else:
            merged[name] = old.to(fresh.dtype)
    for name in release_state:
        if name not in model_state and not asked(name):
            problems.append(
                f"{name} {tuple(release_state[name].shape)} is in the release but not in the model"
            )
    if problems:
        listing = "; ".join(problems[:12]) + (
            f"; and {len(problems) - 12} more" if len(problems) > 12 else ""
        )
        raise UserError(
            f"weights of {origin} do not fit the model: {listing}. If these are heads to train "
            "afresh, name them in finetune.reinit (glob patterns, e.g. "
            f"'finetune.reinit=[{problems[0].split(' ')[0].rstrip(':').rsplit('.', 1)[0]}.*]')"
        )
    return merged, reinitialized


def init_from_release(model: torch.nn.Module, finetune_cfg: Any) -> list[str]:
    """Load a release's weights into `model` before training (`finetune.init_from`); returns the names
    of the tensors re-initialized (matched by `finetune.reinit`)."""
    folder = fetch_release(finetune_cfg.init_from, getattr(finetune_cfg, "sha256", None))
    release_state, name = release_weights(folder, bool(finetune_cfg.use_ema))
    merged, reinitialized = merge_for_init(
        model.state_dict(),
        release_state,
        list(finetune_cfg.reinit or []),
        f"{finetune_cfg.init_from} ({name})",
    )
    model.load_state_dict(merged, strict=True)
    return reinitialized


def load_release_model(source: str | Path, use_ema: bool = True) -> tuple[Any, Any]:
    """(model in eval mode, typed config) from a release alone, for sampling and evaluation."""
    folder = fetch_release(source)
    cfg = config_from_container(OmegaConf.to_container(OmegaConf.load(folder / "config.yaml")))
    spec_fields = json.loads((folder / "data_spec.json").read_text())
    spec_fields["shape"] = tuple(spec_fields["shape"])
    model = get_family(cfg.model.family).module(cfg.model, cfg.optim, DataSpec(**spec_fields))
    recorded = release_info(folder).get("stage1")
    if recorded and (model.stage1_source or {}).get("sha256") != recorded["sha256"]:
        raise UserError(f"release {source}: its first stage {recorded['path']} had sha256 "
                        f"{recorded['sha256'][:12]}..., the model.stage1 found now differs; restore that checkpoint")
    state, _ = release_weights(folder, use_ema)
    model.load_state_dict(state)
    model.eval()
    return model, cfg
