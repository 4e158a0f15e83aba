# Two entry points: `make demo` and `make test`. Both create .venv on first use; the install
# re-runs only when pyproject.toml changes. The demos need the package alone; test, lint and bench
# add the dev extras (loggers, Optuna, the web app, pytest, ruff, mypy).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
DEMO_DIR := outputs/demo
T2I_DIR := outputs/demo_t2i
JUDGE := outputs/classifier_mnist/checkpoints/last.ckpt

.PHONY: help install demo demo-t2i test lint typecheck bench clean

help:
	@echo "make demo       train the MNIST diffusion model (flow matching, ~3 min on 2 CPU cores), export, sample"
	@echo "                and evaluate it in $(DEMO_DIR)/ (~8 min from a fresh clone, install included)"
	@echo "make demo-t2i   a latent text-to-image model on captioned digits: VAE, base model on 0-7, LoRA teaching 8 and 9,"
	@echo "                export, sample and evaluate, in $(T2I_DIR)/ (~12 min on 2 CPU cores)"
	@echo "make test       ruff + the test suite"
	@echo "make lint       ruff + mypy"
	@echo "make bench      the performance benchmarks in benchmarks/"
	@echo "make clean      remove outputs/ and caches (keeps .venv)"

# Byte-compiled once, on both cores (compileall -j 0, ~40 s; pip compiles one file at a time). Where
# PYTHONDONTWRITEBYTECODE is set, as in many containers, nothing is cached on import, and every
# command would compile torch & co. again (~17 s a process). A few packages ship template files
# that are not Python; compileall reports them and goes on, hence the ignored status.
COMPILE := $(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e .
	$(COMPILE)
	@touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e ".[dev]"
	$(COMPILE)
	@touch $(DEV_STAMP)

install: $(DEV_STAMP)

# The digit judge that scores the demo's samples (about a minute); trained once.
$(JUDGE): | $(STAMP)
	$(BIN)/diffusion-lightning fit --config configs/classifier_mnist.yaml --trainer.enable_progress_bar false

# The exported folder records the config's 10 DPM-Solver++ steps and guidance 2; sample and evaluate use them.
demo: $(STAMP) $(JUDGE)
	$(BIN)/diffusion-lightning fit --config configs/ddpm_mnist.yaml --trainer.default_root_dir $(DEMO_DIR)
	$(BIN)/diffusion-lightning export --ckpt $(DEMO_DIR)/checkpoints/last.ckpt --out $(DEMO_DIR)/pipeline --overwrite
	$(BIN)/diffusion-lightning sample --pipeline $(DEMO_DIR)/pipeline --out $(DEMO_DIR) --n-per-class 8 --no-images
	$(BIN)/diffusion-lightning evaluate --pipeline $(DEMO_DIR)/pipeline --judge $(JUDGE) --n-samples 500
	@echo "demo outputs: $(DEMO_DIR)/samples.png $(DEMO_DIR)/pipeline/ $(DEMO_DIR)/metrics.json $(DEMO_DIR)/eval/"

# VAE -> text-to-image base model on the digits 0-7 -> LoRA teaching 8 and 9 (50 examples each,
# prior preservation) -> exports, samples and the judge's scores of every digit. The base trains 600
# steps (the config's 1000 are for all ten digits), and everything is sampled at the LoRA config's guidance 2.
demo-t2i: $(STAMP) $(JUDGE)
	$(BIN)/diffusion-lightning fit --config configs/vae_digits.yaml --trainer.default_root_dir $(T2I_DIR)/vae_run
	$(BIN)/diffusion-lightning export --ckpt $(T2I_DIR)/vae_run/checkpoints/last.ckpt --out $(T2I_DIR)/vae --overwrite
	$(BIN)/diffusion-lightning fit --config configs/t2i_digits.yaml --trainer.default_root_dir $(T2I_DIR)/base_run \
	  --model.init_args.components.pretrained_vae $(T2I_DIR)/vae --data.init_args.digits [0,1,2,3,4,5,6,7] \
	  --model.init_args.latent_cache_dir $(T2I_DIR)/latents --trainer.max_steps 600
	$(BIN)/diffusion-lightning export --ckpt $(T2I_DIR)/base_run/checkpoints/last.ckpt --out $(T2I_DIR)/pipeline --overwrite
	rm -rf $(T2I_DIR)/lora_run $(T2I_DIR)/prior  # the class images come from this run's base model
	$(BIN)/diffusion-lightning fit --config configs/t2i_digits_lora.yaml --trainer.default_root_dir $(T2I_DIR)/lora_run \
	  --model.init_args.pretrained $(T2I_DIR)/pipeline --model.init_args.prior_data_dir $(T2I_DIR)/prior \
	  --model.init_args.latent_cache_dir $(T2I_DIR)/latents
	$(BIN)/diffusion-lightning export --ckpt $(T2I_DIR)/lora_run/checkpoints/last.ckpt --out $(T2I_DIR)/lora --overwrite
	$(BIN)/diffusion-lightning export --ckpt $(T2I_DIR)/lora_run/checkpoints/last.ckpt --out $(T2I_DIR)/pipeline_lora \
	  --merge-lora --overwrite
	$(BIN)/diffusion-lightning sample --pipeline $(T2I_DIR)/pipeline_lora --out $(T2I_DIR)/samples --n-per-prompt 8 \
	  --prompt "a handwritten digit zero" "the number 1 written by hand" "two" "3" "a handwritten digit four" \
	  "the number 5 written by hand" "six" "7" "a handwritten digit eight" "the number 9 written by hand" --no-images \
	  --guidance-scale 2
	$(BIN)/diffusion-lightning evaluate --pipeline $(T2I_DIR)/pipeline --prompts configs/prompts/digits.txt \
	  --judge $(JUDGE) --n-samples 200 --metrics judge --guidance-scale 2 --out $(T2I_DIR)/eval_base
	$(BIN)/diffusion-lightning evaluate --pipeline $(T2I_DIR)/pipeline_lora --prompts configs/prompts/digits.txt \
	  --judge $(JUDGE) --n-samples 200 --metrics judge --guidance-scale 2 --out $(T2I_DIR)/eval_lora
	@echo "demo outputs: $(T2I_DIR)/samples/samples.png $(T2I_DIR)/pipeline/ $(T2I_DIR)/lora/ $(T2I_DIR)/eval_base/ $(T2I_DIR)/eval_lora/"

# Two workers (one thread each), one test file per worker at a time: module fixtures are built once.
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy diffusion_lightning

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/watcher_overhead.py
	$(BIN)/python benchmarks/stack_overhead.py
	$(BIN)/python benchmarks/demo_quality.py
	$(BIN)/python benchmarks/quality_mnist.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache .mypy_cache
