# Two commands do all set-up on first use: `make train` and `make test-all` (or any test target).
VENV ?= .venv
PYTHON ?= python3
# The torch/torchvision pair this project is tested with; override for another build,
# e.g. make train TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cu124"
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
ARGS ?=
TEST_WORKERS ?= 2

.PHONY: train lint check test test-all results docs gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Train the default (reference) config on whatever this machine has: DDP on all GPUs, one GPU, or CPU.
train: $(STAMP)
	$(VENV)/bin/distrnn train --config configs/default.yaml $(ARGS)

# Lint with the rule set pinned in pyproject.toml ([tool.ruff.lint]); ruff comes with the dev extra.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The everyday tier, after lint: tests/unit, which starts no process (about 1 min on 2 cores; tests/README.md).
check: lint
	$(VENV)/bin/python -m pytest -q --durations=25 tests/unit $(ARGS)

# Unit and integration tiers: real processes (gloo ranks, distrnn runs) on this machine; no root, no cluster.
test: $(STAMP)
	$(VENV)/bin/python -m pytest --durations=25 tests/unit tests/integration $(ARGS)

# Every tier, as CI runs it (.ci/run): cluster/ needs root and a SLURM cluster; CPU only, real MNIST.
# Two pytest-xdist workers (tests/conftest.py keeps each module on one worker and the cluster tier in one
# queue): 20:40 instead of 30:46 one at a time on 2 cores of an Intel Xeon (docs/contributing.md, "The
# suite's time"). TEST_WORKERS=0: one test at a time.
test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) -v --durations=25 tests $(ARGS)

# The README's results table, from the runs it lists (about 3 minutes on 2 cores); rerun when training changes.
results: $(STAMP)
	$(VENV)/bin/python -m benchmarks.results_table $(ARGS)

# The config table in docs/configuration.md, from the help text of each key in distrnn/config/schema.py (a test keeps them equal).
docs: $(STAMP)
	$(VENV)/bin/python -m devtools.readme

# On a GPU machine, against the torch already installed there (no venv, nothing downloaded): distrnn
# without its dependencies, then the GPU checks (< 6 min on one modern GPU); needs DISTRNN_DATA_DIR.
# Writes benchmarks/results/gpu-<gpu name>.json and .md (ARGS="--out DIR" to write elsewhere).
gpu-check:
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) -m benchmarks.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) runs
