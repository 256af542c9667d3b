"""Typed recipe schemas and the defaults <- recipe <- command-line merge."""

from scalegen.config.loader import config_from_container, find_recipe, load_config, plain, resolved
from scalegen.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    EMAConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainerConfig,
    choice,
)

__all__ = [
    "CheckpointConfig", "Config", "DataConfig", "EMAConfig", "EvalConfig", "LoggingConfig", "ModelConfig",
    "OptimConfig", "RunConfig", "TrainerConfig", "choice", "config_from_container", "find_recipe",
    "load_config", "plain", "resolved",
]
