"""Training runtime: builds Lightning's Trainer from a config and runs it."""

from scalegen.runtime.checkpoint import load_model, newest_checkpoint, read_checkpoint
from scalegen.runtime.train import build_trainer, run_dir_of, train

__all__ = ["build_trainer", "load_model", "newest_checkpoint", "read_checkpoint", "run_dir_of", "train"]
