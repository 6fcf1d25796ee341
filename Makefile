# The README's two commands: `make run` (set-up + the main job) and `make test` (set-up + tests).
# Set-up is idempotent: a virtual environment in .venv with the project installed in editable mode.
PYTHON ?= python3
VENV ?= .venv
# The torch release the project is developed and tested against; override with TORCH=torch==X.Y.Z
# (or TORCH=torch for the newest) where another build is wanted.
TORCH ?= torch==2.13.0
# Training runs `make run` trains at once (one process of one thread each): one per CPU core.
JOBS ?= 2
BIN := $(VENV)/bin

.PHONY: setup run test test-slow lint bench docs gpu-check gpu-wheels clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/sparse-sinkhorn sort --overwrite --jobs $(JOBS)

test: setup
	$(BIN)/python -m pytest -q

# Also the tests marked slow (torch.compile of a layer, long experiment runs).
test-slow: setup
	$(BIN)/python -m pytest -q --runslow

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m benchmarks.attention

# The documentation site (mkdocs.yml, docs/) into build/site/, failing on any warning or broken link;
# installs the docs extra first when mkdocs is missing.
docs: setup
	@$(BIN)/python -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null || \
		$(BIN)/python -m pip install --quiet -e ".[dev,docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The CUDA checks (gpu-marked tests, then a short CUDA benchmark into benchmarks/results/cuda/,
# then the README's GPU section), in <= 8 min on one H200. No venv and no network: the machine's
# preinstalled torch, the project from src/, the peer from the wheels in benchmarks/wheels/.
# Without CUDA it prints one line and exits 0. COPY_TO=dir also copies the results there.
GPU_PYTHON ?= python3
gpu-check:
	@$(GPU_PYTHON) -m benchmarks.gpu_check

# Refresh benchmarks/wheels/ (needs the network; the wheels are committed, ~130 KB).
gpu-wheels:
	rm -f benchmarks/wheels/*.whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --dest benchmarks/wheels \
		-r benchmarks/wheels/requirements.txt

clean:
	rm -rf $(VENV) build dist src/*.egg-info
