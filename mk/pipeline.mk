# Kubeflow Pipelines on this machine: the same components and graph through kfp.local, no cluster. Included by the
# root Makefile (`-include mk/*.mk`). compile / upload / schedule against a cluster live in mk/infra.mk.
#
#   make pipeline-local CONFIG=configs/quickstart/smollm2-135m-lora-cpu.yaml
#   make pipeline-local CONFIG=... PIPELINE_ROOT=runs/try PIPELINE_SET="lora.r=8 train.max_steps=20"
#
# CONFIG is shared with mk/infra.mk (the config a run or schedule uses).
CONFIG ?=
# Where the runs, checkpoints and the default MLflow store go (empty: the config's output_dir).
PIPELINE_ROOT ?=
# Config overrides, space-separated KEY=VALUE.
PIPELINE_SET ?=
# Train on the `cpu` or the `gpu` branch (locally both run on this machine's CPU).
PIPELINE_ACCELERATOR ?= cpu

.PHONY: pipeline-local test-pipeline

pipeline-local: setup ## run the KFP pipeline locally (kfp.local): make pipeline-local CONFIG=configs/x.yaml
	@test -n "$(CONFIG)" || { echo "error: set CONFIG to a kubetune config, e.g. make pipeline-local CONFIG=configs/quickstart/smollm2-135m-lora-cpu.yaml" >&2; exit 2; }
	$(KUBETUNE) pipeline run --local --config $(CONFIG) --accelerator $(PIPELINE_ACCELERATOR) \
	  $(if $(PIPELINE_ROOT),--root $(PIPELINE_ROOT)) $(addprefix --set ,$(PIPELINE_SET))

test-pipeline: setup ## pipeline tests: compiled structure, fake KFP API, the local end-to-end run
	$(VENV)/bin/pytest tests/pipeline $(PYTEST_ARGS)
