# Two commands do all set-up on first use: `make train` and `make test`.
VENV ?= .venv
PYTHON ?= python3
# The torch/torchvision pair this project is tested with; override for another build,
# e.g. make train TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cu124"
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: train check test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Train the default (reference) config on whatever this machine has: DDP on all GPUs, one GPU, or CPU.
train: $(STAMP)
	$(VENV)/bin/distrnn train --config configs/default.yaml $(ARGS)

# The everyday subset (< 2 min on 2 cores): unit tests, rank logic on real gloo processes, CLI errors.
check: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow" $(ARGS)

# The whole suite, as CI runs it (CPU only, real processes, real MNIST from $$DISTRNN_DATA_DIR or ./data).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -v $(ARGS)

clean:
	rm -rf $(VENV) runs
