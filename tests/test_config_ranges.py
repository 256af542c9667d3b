"""Recipes refused before anything runs: every numeric field's range, impossible combinations, one-line CLI errors.

The out-of-range values are derived here from each field's declared bounds (one just outside each bound, the
bound itself inside for >= and <=); what is checked is the loader's refusal and its one-line message.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from scalegen.cli.main import main
from scalegen.config import load_config
from scalegen.config.loader import RECIPES_DIR, apply_overrides, range_problem
from scalegen.config.schema import Config, OptimConfig
from scalegen.dataspec import DataSpec
from scalegen.errors import ConfigError, UserError
from scalegen.registry import families

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if p.name != "base.yaml")
FAMILIES = sorted(families())


def _is_numeric(tp: Any) -> bool:
    """int, float, their Optional forms and lists of them (bool is not a number here)."""
    if tp in (int, float):
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return _is_numeric(args[0])
    if origin in (typing.Union, types.UnionType):
        return all(_is_numeric(a) for a in args if a is not type(None))
    return False


def _numeric_fields(schema: Any, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any, Any]]:
    """(dotted key, field, its type, the section instance) for every numeric field of a schema instance."""
    out = []
    hints = typing.get_type_hints(type(schema))
    for f in dataclasses.fields(schema):
        value = getattr(schema, f.name)
        if dataclasses.is_dataclass(value):
            out += _numeric_fields(value, f"{prefix}{f.name}.")
        elif _is_numeric(hints[f.name]):
            out.append((f"{prefix}{f.name}", f, hints[f.name], schema))
    return out


def _every_numeric_field() -> list[tuple[str, str, dataclasses.Field, Any, Any]]:
    """(family, key, field, type, section) over all families; the shared sections once (with the first)."""
    out = []
    for family in FAMILIES:
        for key, f, tp, section in _numeric_fields(Config(model=families()[family].config())):
            if key.startswith("model.") or family == FAMILIES[0]:
                out.append((family, key, f, tp, section))
    return out


FIELDS = _every_numeric_field()


def _is_int(tp: Any) -> bool:
    return tp is int or int in typing.get_args(tp) or (typing.get_origin(tp) is list and typing.get_args(tp)[0] is int)


def _bound_cases() -> list[Any]:
    """One case per bound of every numeric field: (family, key, op, bound value, is int, is list)."""
    cases = []
    for family, key, f, tp, section in FIELDS:
        bounds = f.metadata.get("range", {})
        is_list = typing.get_origin(tp) is list
        for op, bound in bounds.items() or [("finite", None)]:
            if isinstance(bound, str):  # a sibling field: its default is the bound
                bound = getattr(section, bound)
            cases.append(pytest.param(family, key, op, bound, _is_int(tp), is_list, id=f"{family}:{key}:{op}"))
    return cases


def _minimal_recipe(tmp_path: Path, family: str) -> Path:
    path = tmp_path / f"{family}.yaml"
    path.write_text(f"model: {{family: {family}}}\ntrainer: {{max_epochs: 1}}\n")
    return path


def _literal(value: float, is_list: bool) -> str:
    text = "nan" if isinstance(value, float) and math.isnan(value) else repr(value)
    return f"[{text}]" if is_list else text


def test_every_numeric_field_declares_its_range() -> None:
    missing = [f"{family}: {key}" for family, key, f, _, _ in FIELDS if "range" not in f.metadata]
    assert not missing, f"numeric fields without ranged(...): {missing}"
    # The walk found the fields the issue names, in the shared sections and in a family.
    keys = {key for _, key, *_ in FIELDS}
    assert {"data.batch_size", "optim.lr", "optim.betas", "trainer.max_steps", "model.latent_dim"} <= keys


@pytest.mark.parametrize("family", FAMILIES)
def test_every_default_is_in_range(family: str, tmp_path: Path) -> None:
    cfg = load_config(_minimal_recipe(tmp_path, family))
    assert cfg.model.family == family


@pytest.mark.parametrize("family, key, op, bound, is_int, is_list", _bound_cases())
def test_out_of_range_value_is_refused_in_one_line(family: str, key: str, op: str, bound: float, is_int: bool,
                                                   is_list: bool, tmp_path: Path) -> None:
    step = 1 if is_int else 0.5
    outside = float("nan") if op == "finite" else {"ge": bound - step, "gt": bound, "le": bound + step,
                                                    "lt": bound}[op]
    override = f"{key}={_literal(outside, is_list)}"
    recipe = _minimal_recipe(tmp_path, family)
    with pytest.raises(ConfigError) as err:
        load_config(recipe, [override])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{key}="), message
    kind = "each element must be" if is_list else "must be"
    assert f" (from override {override!r}) is out of range: {kind} " in message, message
    if op != "finite":
        assert str(bound) in message.split("out of range: ", 1)[1], message
    else:
        assert message.endswith("must be finite"), message
    # The bound itself passes where the range includes it, and a value just inside where it does not.
    if op != "finite":
        inside = {"ge": bound, "le": bound, "gt": bound + step / 100, "lt": bound - step / 100}[op]
        if is_int:
            inside = {"gt": bound + 1, "lt": bound - 1}.get(op, inside)
        one_bound = {op: bound}
        assert range_problem(key, [inside] if is_list else inside, one_bound) is None
        assert range_problem(key, [inside, outside] if is_list else outside, one_bound) is not None


def test_a_recipe_file_with_a_bad_value_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: quickstart\nema: {decay: 1.5}\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value) == f"ema.decay=1.5 (from {bad.resolve()}) is out of range: must be in [0, 1]"


def test_an_interpolated_value_is_checked_once_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEGEN_TEST_BATCH", "0")
    override = "data.batch_size=${oc.env:SCALEGEN_TEST_BATCH}"
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", [override])
    assert str(err.value) == f"data.batch_size=0 (from override {override!r}) is out of range: must be >= 1"
    monkeypatch.setenv("SCALEGEN_TEST_BATCH", "32")
    assert load_config("quickstart", [override]).data.batch_size == 32


def test_a_bound_naming_another_field_uses_its_final_value() -> None:
    # ddpm/tiny sets timesteps=100 and sample_steps=10: lowering T below the DDIM steps is refused ...
    with pytest.raises(ConfigError) as err:
        load_config("ddpm/tiny", ["model.timesteps=5"])
    assert str(err.value).startswith("model.sample_steps=10 (from ") and "ddpm/tiny.yaml" in str(err.value)
    assert str(err.value).endswith("is out of range: must be in [1, model.timesteps=5]")
    # ... and raising both together is fine, in either order of the overrides.
    cfg = load_config("ddpm/tiny", ["model.sample_steps=200", "model.timesteps=400"])
    assert (cfg.model.sample_steps, cfg.model.timesteps) == (200, 400)


def test_every_n_train_steps_alone_just_works() -> None:
    cfg = load_config("quickstart", ["checkpoint.every_n_train_steps=3"])
    assert (cfg.checkpoint.every_n_train_steps, cfg.checkpoint.every_n_epochs) == (3, None)
    ck = cfg.checkpoint  # what runtime/train.py hands to Lightning, which accepts it (it refused 3 with 1)
    ModelCheckpoint(monitor=ck.monitor, every_n_train_steps=ck.every_n_train_steps, every_n_epochs=ck.every_n_epochs)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["checkpoint.every_n_train_steps=3", "checkpoint.every_n_epochs=1"],
         "checkpoint.every_n_train_steps=3 (from override 'checkpoint.every_n_train_steps=3') and "
         "checkpoint.every_n_epochs=1 (from override 'checkpoint.every_n_epochs=1') cannot both be set"),
        (["trainer.max_epochs=null"],
         "trainer.max_steps=-1 (from the schema default) and trainer.max_epochs=null (from override "
         "'trainer.max_epochs=null') leave the run without a length"),
        (["data.resampled=true"],
         "data.resampled=True (from override 'data.resampled=true') is an endless stream"),
        (["optim.scale_lr=sqrt"],
         "optim.scale_lr='sqrt' (from override 'optim.scale_lr=sqrt') needs the global batch the lr was tuned "
         "for, but optim.reference_batch_size=0 (from the schema default)"),
        (["data.mu_law=1"], "data.mu_law=1 (from override 'data.mu_law=1'): mu-law needs at least 2 levels"),
        (["trainer.limit_val_batches=2.5"], "trainer.limit_val_batches=2.5 (from override "
         "'trainer.limit_val_batches=2.5') is out of range: must be a fraction in [0, 1] or a whole number"),
        (["trainer.devices=0"], "trainer.devices=0 (from override 'trainer.devices=0') is out of range"),
        (["model.likelihood=poisson"],
         "model.likelihood='poisson' (from override 'model.likelihood=poisson') is not allowed"),
    ],
)
def test_combinations_that_cannot_work_are_refused(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["trainer.max_epochs=-1"],  # explicitly until stopped
    ["trainer.max_steps=100", "trainer.max_epochs=null"],
    ["data.resampled=true", "trainer.max_steps=100", "trainer.max_epochs=null"],
    ["optim.scale_lr=linear", "optim.reference_batch_size=256"],
    ["trainer.limit_val_batches=3"],  # a whole number: batches
    ["checkpoint.every_n_epochs=2"],
    ["checkpoint.every_n_train_steps=5", "checkpoint.every_n_epochs=0"],
    ["trainer.devices=auto"],
])
def test_combinations_that_work_load(overrides: list[str]) -> None:
    load_config("quickstart", overrides)


def test_eval_overrides_are_range_checked() -> None:
    cfg = load_config("quickstart")
    assert apply_overrides(cfg, ["eval.iwae_k=10"]).eval.iwae_k == 10
    with pytest.raises(ConfigError, match=r"^eval.batch_size=0 \(from override 'eval.batch_size=0'\) is out of "
                                          r"range: must be >= 1$"):
        apply_overrides(cfg, ["eval.batch_size=0"])


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(RECIPES_DIR)) for p in RECIPES])
def test_every_recipe_loads_and_lightning_accepts_its_checkpoint_schedule(recipe: Path) -> None:
    """Before ranges, recipes that set checkpoint.every_n_train_steps failed in Lightning after start-up."""
    ck = load_config(recipe).checkpoint
    ModelCheckpoint(monitor=ck.monitor, mode=ck.mode, save_top_k=ck.save_top_k, save_last=ck.save_last,
                    every_n_train_steps=ck.every_n_train_steps, every_n_epochs=ck.every_n_epochs)


@pytest.mark.parametrize("key, outside, boundary", [
    ("trainer.max_steps", -2, -1),
    ("trainer.max_epochs", -2, -1),
    ("trainer.limit_val_batches", -0.5, 0.0),
    ("trainer.limit_val_batches", 2.5, 3.0),
    ("trainer.num_nodes", 0, 1),
    ("trainer.devices", 0, 1),
    ("checkpoint.save_top_k", -2, -1),
    ("checkpoint.every_n_train_steps", -1, 0),
    ("checkpoint.every_n_epochs", -1, 0),
])
def test_ranges_agree_with_lightning_where_it_checks(key: str, outside: float, boundary: float) -> None:
    """Where Lightning itself validates a setting when the Trainer or ModelCheckpoint is built, it refuses
    what the loader refuses and accepts the boundary the loader accepts (an independent check of the range)."""
    section, name = key.split(".")

    def lightning_accepts(value: float) -> bool:
        try:
            if section == "checkpoint":
                ModelCheckpoint(**{name: value})
            else:
                L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, **{name: value})
        except Exception:  # Lightning's MisconfigurationException, ValueError or TypeError
            return False
        return True

    with pytest.raises(ConfigError, match=f"^{key}="):
        load_config("quickstart", [f"{key}={outside}"])
    assert not lightning_accepts(outside)
    load_config("quickstart", [f"{key}={boundary}"])
    assert lightning_accepts(boundary)


# ---- family constructors ------------------------------------------------------------------------------------
def test_family_constructors_raise_user_errors() -> None:
    entries = families()
    gan, diffusion = entries["gan"], entries["diffusion"]
    for entry, (h, w) in ((gan, (8, 6)), (entries["lapgan"], (32, 16))):  # named as asked for, with the fix
        with pytest.raises(UserError, match=rf"^the {entry.name} family needs square images \[C, H, H\]; the data "
                                            rf"are {h}x{w}: set data.center_crop={w} \(or data.resize and "
                                            r"data.center_crop\)$"):
            entry.module(entry.config(), OptimConfig(), DataSpec(shape=(1, h, w)))
    audio = DataSpec(kind="audio", shape=(1, 4000), num_classes=0, levels=256)
    for entry in (gan, diffusion):
        with pytest.raises(UserError, match=f"^the {entry.name} family models images; data 'audio'"):
            entry.module(entry.config(), OptimConfig(), audio)
    gan.module(gan.config(), OptimConfig(), DataSpec(shape=(1, 8, 8)))  # square images build


# ---- the command line ---------------------------------------------------------------------------------------
def scalegen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalegen", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


CLI_CASES = [  # (command, override, the one line after "scalegen COMMAND: error: ")
    ("train", "data.batch_size=0", "data.batch_size=0 (from override 'data.batch_size=0') is out of range: "
                                   "must be >= 1"),
    ("train", "data.batch_size=-5", "data.batch_size=-5 (from override 'data.batch_size=-5') is out of range: "
                                    "must be >= 1"),
    ("train", "optim.lr=-1", "optim.lr=-1.0 (from override 'optim.lr=-1') is out of range: must be > 0"),
    ("train", "trainer.max_steps=-7", "trainer.max_steps=-7 (from override 'trainer.max_steps=-7') is out of "
                                      "range: must be >= -1"),
    ("train", "model.latent_dim=0", "model.latent_dim=0 (from override 'model.latent_dim=0') is out of range: "
                                    "must be >= 1"),
    ("config", "optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0] (from override 'optim.betas=[0.9,1.0]') is "
                                        "out of range: each element must be in [0, 1)"),
    ("slurm", "ema.decay=2", "ema.decay=2.0 (from override 'ema.decay=2') is out of range: must be in [0, 1]"),
]


def _cli_args(command: str, override: str, run_dir: Path) -> list[str]:
    return {"train": ["train", "quickstart", override, f"run.dir={run_dir}"],
            "config": ["config", "quickstart", override],
            "slurm": ["slurm", "submit", "quickstart", override, "--nodes", "1", "--gpus-per-node", "0",
                      "--dry-run"]}[command]


@pytest.mark.parametrize("command, override, expected", CLI_CASES)
def test_main_refuses_in_one_line_with_status_2(command: str, override: str, expected: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    assert main(_cli_args(command, override, tmp_path)) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"scalegen {command}: error: {expected}"] and not captured.out
    assert not list(tmp_path.iterdir())  # refused before a run folder was made


@pytest.mark.parametrize("command, override, expected", [
    pytest.param(*case, marks=[] if i == 0 else [pytest.mark.slow]) for i, case in enumerate(CLI_CASES)])
def test_cli_process_refuses_in_one_line_with_status_2(command: str, override: str, expected: str,
                                                       tmp_path: Path) -> None:
    """The real process (`python -m scalegen`): exit status 2, one stderr line, no traceback. Each start
    imports torch, so all but the first case are marked slow."""
    out = scalegen(*_cli_args(command, override, tmp_path))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [f"scalegen {command}: error: {expected}"]
    assert not list(tmp_path.iterdir())


def test_cli_yaml_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {family: vae\n")
    assert main(["config", str(bad)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"scalegen config: error: cannot parse recipe {bad}")


def test_config_prints_every_n_train_steps_alone(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "quickstart", "checkpoint.every_n_train_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "every_n_train_steps: 3\n" in out and "every_n_epochs: null\n" in out


def test_training_with_every_n_train_steps_alone(tmp_path: Path, train_recipe) -> None:
    """The documented `checkpoint.every_n_train_steps=3` (a MisconfigurationException before): a real run
    checkpoints at steps 3 and 6 and not at the end of an epoch (vae/tiny's epoch is longer than 6 steps)."""
    run = train_recipe("vae/tiny", tmp_path / "steps", "checkpoint.every_n_train_steps=3", "checkpoint.save_top_k=-1",
                       "checkpoint.monitor=train/loss", "trainer.max_steps=6", "trainer.max_epochs=null")
    saved = sorted(p.name for p in (run / "checkpoints").glob("best-*.ckpt"))
    assert saved == ["best-step=3.ckpt", "best-step=6.ckpt"]


@pytest.mark.parametrize("family, overrides, fragment", [
    ("gan", {"min_resolution": 16}, "cannot be halved"),
    ("diffusion", {"base_channels": 8, "num_heads": 3}, "heads"),
    ("pixelcnn", {"architecture": "pixelcnn", "kernel_size": 4}, "odd"),
])
def test_network_shape_refusals_are_one_line_user_errors(family: str, overrides: dict, fragment: str) -> None:
    """Shapes only the network can judge (halvings, heads, kernel parity) are refused by the family's
    constructor as a ConfigError in one line, not a ValueError traceback."""
    entry = families()[family]
    cfg = entry.config(**overrides)
    with pytest.raises(ConfigError) as caught:
        entry.module(cfg, OptimConfig(), DataSpec(shape=(1, 8, 8)))
    message = str(caught.value)
    assert fragment in message and "\n" not in message and f"the {family} family" in message, message


class _CountValidationBatches(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.val_batches = 0

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)  # 8 batches


@pytest.mark.parametrize("value, batches", [("1", 1), ("3", 3), ("1.0", 8), ("0.5", 4), ("0", 0)])
def test_limit_val_batches_whole_numbers_are_batches_and_decimals_fractions(value: str, batches: int) -> None:
    """`limit_val_batches: 1` in a recipe means one batch, as in Lightning; it was read as the float 1.0
    (the whole split) until the field kept ints as ints (a DDPM validation then ran the bound over all
    5,000 validation images)."""
    limit = load_config("quickstart", [f"trainer.limit_val_batches={value}"]).trainer.limit_val_batches
    module = _CountValidationBatches()
    L.Trainer(limit_val_batches=limit, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False).validate(module, verbose=False)
    assert module.val_batches == batches
