"""The global-batch rule, the learning-rate rule, and config -> Lightning Trainer arguments."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from scalegen.config.schema import OptimConfig, TrainerConfig
from scalegen.distributed import accumulation_steps, batch_plan, scaled_lr, trainer_kwargs, world_size
from scalegen.errors import UserError


def trainer(**kw):
    cfg = OmegaConf.structured(TrainerConfig)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@given(
    per_device=st.integers(1, 64), devices=st.integers(1, 8), nodes=st.integers(1, 8), acc=st.integers(1, 16)
)
def test_accumulation_keeps_the_global_batch(per_device, devices, nodes, acc):
    global_batch = per_device * devices * nodes * acc
    plan = batch_plan(trainer(devices=devices, num_nodes=nodes, global_batch_size=global_batch), per_device)
    assert plan.accumulation == acc
    assert plan.world_size == devices * nodes
    assert (
        plan.per_device_batch_size * plan.world_size * plan.accumulation
        == global_batch
        == plan.global_batch_size
    )


def test_same_recipe_on_one_cpu_and_on_a_cluster():
    # A recipe tuned for 4 nodes x 8 GPUs x 32 per GPU (global 1024) runs on one process by accumulating.
    cluster = batch_plan(trainer(devices=8, num_nodes=4, global_batch_size=1024), 32)
    laptop = batch_plan(trainer(devices=1, num_nodes=1, global_batch_size=1024), 32)
    assert (cluster.accumulation, laptop.accumulation) == (1, 32)
    assert cluster.global_batch_size == laptop.global_batch_size == 1024


def test_global_batch_that_does_not_divide_is_a_user_error_naming_the_numbers():
    with pytest.raises(UserError, match=r"global_batch_size=100 .* 8 x 3 = 24.*96 or 120"):
        accumulation_steps(100, 8, 3)
    with pytest.raises(UserError):
        batch_plan(trainer(devices=2, global_batch_size=30), 4)


def test_without_global_batch_the_accumulation_is_taken_as_given():
    plan = batch_plan(trainer(devices=2, num_nodes=3, accumulate_grad_batches=4), 16)
    assert plan.accumulation == 4 and plan.global_batch_size == 16 * 6 * 4


@pytest.mark.parametrize("rule, expected", [("none", 1e-3), ("linear", 4e-3), ("sqrt", 2e-3)])
def test_lr_scaling_rules(rule, expected):
    optim = OmegaConf.structured(OptimConfig(lr=1e-3, scale_lr=rule, reference_batch_size=256))
    plan = batch_plan(trainer(devices=4, num_nodes=2, global_batch_size=1024), 32, optim)
    assert math.isclose(plan.lr, expected, rel_tol=1e-12)


def test_lr_is_not_scaled_without_a_reference_batch():
    assert scaled_lr(1e-3, "linear", 4096, 0) == 1e-3


def test_world_size_reads_lists_and_strings():
    assert world_size(trainer(devices=[0, 1, 2], num_nodes=2)) == 6
    assert world_size(trainer(devices="2", num_nodes=1)) == 2
    with pytest.raises(UserError):
        world_size(trainer(devices=0))


def test_trainer_kwargs_ddp_on_cpu():
    from lightning.pytorch.strategies import DDPStrategy

    kw = trainer_kwargs(
        trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            global_batch_size=64,
            gradient_clip_val=1.0,
            find_unused_parameters=True,
        ),
        8,
    )
    assert isinstance(kw["strategy"], DDPStrategy)
    assert kw["strategy"]._ddp_kwargs.get("find_unused_parameters") is True
    assert kw["accumulate_grad_batches"] == 4 and kw["precision"] == "32-true"


def test_trainer_kwargs_fsdp():
    from lightning.pytorch.strategies import FSDPStrategy

    kw = trainer_kwargs(trainer(accelerator="cpu", devices=2, strategy="fsdp", offload_parameters=True), 8)
    assert isinstance(kw["strategy"], FSDPStrategy)


def test_deepspeed_through_lightning_needs_gpus():
    with pytest.raises(UserError, match="needs GPUs"):
        trainer_kwargs(trainer(accelerator="cpu", strategy="deepspeed_stage_2"), 8)


def test_offload_without_a_sharding_strategy_is_refused():
    with pytest.raises(UserError, match="offload"):
        trainer_kwargs(trainer(accelerator="cpu", strategy="auto", offload_optimizer=True), 8)


def test_trainer_kwargs_instantiate_a_real_trainer():
    import lightning as L

    kw = trainer_kwargs(trainer(accelerator="cpu", devices=1, global_batch_size=48), 16)
    t = L.Trainer(
        **kw, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    assert t.accumulate_grad_batches == 3 and t.world_size == 1
