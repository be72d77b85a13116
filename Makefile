# kubetune: `make help` lists the targets. CI runs `.ci/run`, which calls `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
KUBETUNE := $(VENV)/bin/kubetune
PYTEST_ARGS ?=

.PHONY: help setup lint format test test-unit test-slow test-reliability run clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_.-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The venv is rebuilt when pyproject.toml changes. torch is installed first on its own, pinned, so that pip
# takes the CPU wheel and never resolves a CUDA build through another package.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$$(sed -n 's/.*"torch==\([^"]*\)".*/\1/p' pyproject.toml)"
	$(PIP) install -q -e '.[dev]'
	$(PIP) check
	touch $@

setup: $(VENV)/.installed ## create .venv with the pinned stack (idempotent)

lint: setup ## ruff lint + format check
	$(VENV)/bin/ruff check src tests components pipelines benchmarks
	$(VENV)/bin/ruff format --check src tests components pipelines benchmarks

format: setup ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix src tests components pipelines benchmarks
	$(VENV)/bin/ruff format src tests components pipelines benchmarks

test: setup ## the whole suite CI runs: unit, integration, infra, slow and reliability tests
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: setup ## fast hermetic tests only
	$(VENV)/bin/pytest -m "not slow and not integration and not reliability and not infra" $(PYTEST_ARGS)

test-slow: setup ## slow end-to-end tests (quickstart, local pipeline)
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

test-reliability: setup ## preemption, kill -9, MLflow outage tests (real processes and signals)
	$(VENV)/bin/pytest -m reliability $(PYTEST_ARGS)

clean: ## remove build outputs and local runs (keeps .venv)
	rm -rf build runs .pytest_cache .ruff_cache

-include mk/*.mk
