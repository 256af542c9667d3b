"""Training runtime: builds Lightning's Trainer from a config and runs it (`scalegen.runtime.train`).

`load_model`, `read_checkpoint` and `newest_checkpoint` (from `scalegen.checkpoints`, the one checkpoint
reader) are re-exported here with the built-in families registered, so a script can load any checkpoint.
"""

import scalegen.families  # noqa: F401  (registers the built-in families for load_model)
from scalegen.checkpoints import load_model, newest_checkpoint, read_checkpoint

__all__ = ["load_model", "newest_checkpoint", "read_checkpoint"]
