"""Worker for tests/contract/test_contract_families.py (run as a script, not collected): registers the
test-only families, then trains `RECIPE` with `key=value` overrides through the real runtime
(`scalegen.runtime.train`). With trainer.devices=2 Lightning's DDP launcher re-runs this script for
rank 1, so both ranks register the families. Exits with train's status (3 = preempted)."""

from __future__ import annotations

import sys

import contract_families  # noqa: F401  (registers test_buffered, test_latent_prior, test_semisup)

from scalegen.config import load_config
from scalegen.runtime.train import train

if __name__ == "__main__":
    train(load_config(sys.argv[1], sys.argv[2:]))
