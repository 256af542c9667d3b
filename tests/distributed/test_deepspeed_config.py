"""The DeepSpeed config scalegen generates, checked by DeepSpeed's own config parser."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from scalegen.config.schema import TrainerConfig
from scalegen.distributed import deepspeed_config
from scalegen.errors import UserError

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def trainer(**kw):
    cfg = OmegaConf.structured(TrainerConfig)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def parsed(config: dict):
    """DeepSpeed's own validation of a config (batch arithmetic, precision, ZeRO fields), in one process."""
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(config)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_batch_and_clipping(stage):
    cfg = deepspeed_config(
        trainer(strategy=f"deepspeed_stage_{stage}", global_batch_size=64, gradient_clip_val=0.5), 16
    )
    ds = parsed(cfg)  # outside a process group DeepSpeed checks the batch arithmetic for world size 1
    assert ds.zero_optimization_stage == stage
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.train_batch_size) == (
        16,
        4,
        64,
    )
    assert ds.gradient_clipping == 0.5
    assert not ds.float16_config.enabled and not ds.bfloat16_config.enabled


def test_bf16_mixed_is_autocast_over_fp32_weights():
    ds = parsed(deepspeed_config(trainer(strategy="deepspeed_stage_2", precision="bf16-mixed"), 8))
    assert ds.torch_autocast_enabled and ds.torch_autocast_dtype == torch.bfloat16
    assert not ds.bfloat16_config.enabled and not ds.float16_config.enabled


def test_bf16_true_is_deepspeeds_bf16_mode():
    ds = parsed(deepspeed_config(trainer(strategy="deepspeed_stage_3", precision="bf16-true"), 8))
    assert ds.bfloat16_config.enabled and not ds.torch_autocast_enabled


def test_fp16_dynamic_and_static_loss_scaling():
    dyn = parsed(
        deepspeed_config(
            trainer(
                strategy="deepspeed_stage_2",
                precision="16-mixed",
                initial_scale_power=12,
                loss_scale_window=500,
            ),
            8,
        )
    )
    fp16 = dyn.float16_config
    assert fp16.enabled and fp16.loss_scale == 0  # 0 = dynamic
    assert (fp16.initial_scale_power, fp16.loss_scale_window, fp16.hysteresis) == (12, 500, 2)
    static = parsed(
        deepspeed_config(trainer(strategy="deepspeed_stage_2", precision="16-mixed", loss_scale=128.0), 8)
    )
    assert static.float16_config.loss_scale == 128.0


def test_offload():
    ds = parsed(
        deepspeed_config(
            trainer(strategy="deepspeed_stage_3", offload_optimizer=True, offload_parameters=True), 8
        )
    )
    assert ds.zero_config.offload_optimizer.device == "cpu"
    assert ds.zero_config.offload_param.device == "cpu"
    with pytest.raises(UserError, match="stage 3"):
        deepspeed_config(trainer(strategy="deepspeed_stage_2", offload_parameters=True), 8)


def test_lightning_variant_leaves_accumulation_to_lightning():
    cfg = deepspeed_config(trainer(strategy="deepspeed_stage_2", global_batch_size=64), 8, for_lightning=True)
    assert "gradient_accumulation_steps" not in cfg and "train_batch_size" not in cfg


def test_not_a_deepspeed_strategy():
    with pytest.raises(UserError, match="not a DeepSpeed strategy"):
        deepspeed_config(trainer(strategy="ddp"), 8)


def test_cluster_batch_arithmetic():
    cfg = deepspeed_config(
        trainer(strategy="deepspeed_stage_2", devices=4, num_nodes=2, global_batch_size=512), 16
    )
    assert (
        cfg["train_micro_batch_size_per_gpu"],
        cfg["gradient_accumulation_steps"],
        cfg["train_batch_size"],
    ) == (16, 4, 512)
