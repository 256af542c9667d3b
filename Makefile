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

test: install
	$(BIN)/python -m pytest -m "not slow" -q

lint: install
	$(BIN)/ruff check .
