# Two entry points: `make demo` and `make test`. Both create .venv on first use; the install
# re-runs only when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := outputs/demo
JUDGE := outputs/classifier_mnist/checkpoints/last.ckpt

.PHONY: help install demo test lint typecheck bench clean

help:
	@echo "make demo       train the MNIST DDPM (~12 min on 2 CPU cores), export, sample and evaluate it in $(DEMO_DIR)/"
	@echo "make test       ruff + the test suite"
	@echo "make lint       ruff + mypy"
	@echo "make bench      the performance benchmarks in benchmarks/"
	@echo "make clean      remove outputs/ and caches (keeps .venv)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# The digit judge that scores the demo's samples (about a minute); trained once.
$(JUDGE): | $(STAMP)
	$(BIN)/diffusion-lightning fit --config configs/classifier_mnist.yaml --trainer.enable_progress_bar false

demo: $(STAMP) $(JUDGE)
	$(BIN)/diffusion-lightning fit --config configs/ddpm_mnist.yaml --trainer.default_root_dir $(DEMO_DIR)
	$(BIN)/diffusion-lightning export --ckpt $(DEMO_DIR)/checkpoints/last.ckpt --out $(DEMO_DIR)/pipeline --overwrite
	$(BIN)/diffusion-lightning sample --pipeline $(DEMO_DIR)/pipeline --out $(DEMO_DIR) --n-per-class 8 --no-images
	$(BIN)/diffusion-lightning evaluate --pipeline $(DEMO_DIR)/pipeline --judge $(JUDGE) --n-samples 500
	@echo "demo outputs: $(DEMO_DIR)/samples.png $(DEMO_DIR)/pipeline/ $(DEMO_DIR)/metrics.json $(DEMO_DIR)/eval/"

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy diffusion_lightning

bench: $(STAMP)
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/watcher_overhead.py
	$(BIN)/python benchmarks/stack_overhead.py
	$(BIN)/python benchmarks/demo_quality.py
	$(BIN)/python benchmarks/quality_mnist.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache .mypy_cache
