# The two set-up commands of the README. Each creates .venv on first use and installs what it needs:
# torch first (so pip does not pull a different build), DeepSpeed built against it, then scalegen.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install quickstart test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.14"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

quickstart: install
	$(BIN)/scalegen train quickstart

# One OpenMP thread per process: the suite's nets are tiny and its multi-process tests would otherwise
# oversubscribe the cores (a tiny UNet step went from 0.03 s to 1 s with 2 threads on a busy 2-core machine).
# TEST_WORKERS pytest-xdist processes, one test file each at a time (module fixtures are built once per file).
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadfile --durations=25

lint: install
	$(BIN)/ruff check .
