# The README's two commands: `make run` (set-up + the main job) and `make test` (set-up + tests).
# Set-up is idempotent: a virtual environment in .venv with the project installed in editable mode.
PYTHON ?= python3
VENV ?= .venv
# The torch release the project is developed and tested against; override with TORCH=torch==X.Y.Z
# (or TORCH=torch for the newest) where another build is wanted.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/sparse-sinkhorn sort --overwrite

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m benchmarks.attention

clean:
	rm -rf $(VENV) build dist src/*.egg-info
