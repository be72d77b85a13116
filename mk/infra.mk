# Infrastructure: images, manifests, terraform, deploy. Included by the root Makefile (`-include mk/*.mk`).
# `make deploy PROJECT_ID=my-project` stands everything up; `make help` lists every target.
#
# Settings (override on the command line: make deploy PROJECT_ID=p REGION=europe-west4 ENV=prod TAG=abc1234):
PROJECT_ID ?=
REGION ?= us-central1
# kustomize overlay (manifests/overlays/ENV) and terraform environment (terraform/envs/TF_ENV)
ENV ?= dev
TF_ENV ?= dev
TF_DIR = terraform/envs/$(TF_ENV)
# Images: tagged with the git revision; the compiled pipeline uses exactly these references. A TAG given on the
# command line makes `make deploy` reuse images already pushed under it instead of building.
REGISTRY ?= $(REGION)-docker.pkg.dev/$(PROJECT_ID)/kubetune
TAG ?= $(shell git rev-parse --short HEAD)
CPU_IMAGE = $(REGISTRY)/kubetune-cpu:$(TAG)
GPU_IMAGE = $(REGISTRY)/kubetune-gpu:$(TAG)
MLFLOW_IMAGE = $(REGISTRY)/kubetune-mlflow:$(TAG)
# The torch pin, read from pyproject.toml (the single source of versions).
TORCH_VERSION = $(shell sed -n 's/.*"torch==\([^"]*\)".*/\1/p' pyproject.toml)
# Cloud Build runs as terraform's build service account and stages the source in the artifacts bucket.
BUILD_SA ?= kubetune-build@$(PROJECT_ID).iam.gserviceaccount.com
ARTIFACTS_BUCKET ?= $(PROJECT_ID)-kubetune-artifacts
# Pipeline: compiled file, KFP endpoint (empty: a port-forward to the in-cluster UI), schedule.
PIPELINE_FILE = build/sft_pipeline.yaml
# The train tasks mount this claim (manifests/base/pipeline/checkpoints.yaml: the bucket's checkpoints/ prefix
# through the GCS FUSE CSI driver), so checkpoints outlive a preempted pod and a retry resumes from them.
CHECKPOINT_PVC = kubetune-checkpoints
KFP_HOST ?=
KFP_LOCAL_PORT ?= 8080
CRON ?= 0 3 * * 0
CONFIG ?=
# terraform apply asks before changing anything unless AUTO_APPROVE=yes; destroy asks unless CONFIRM=yes.
AUTO_APPROVE ?=
CONFIRM ?=
# HF_TOKEN, if set in the environment, goes into the Secret hf-token (kubeflow namespace) the pipeline reads.
export HF_TOKEN
DEPLOY_DIR = build/deploy/$(ENV)
OVERLAYS = $(notdir $(wildcard manifests/overlays/*))
# Offline check tools, each set in its own venv (see requirements/infra-tools.txt for why).
INFRA_VENV ?= .venv-infra
HCL_VENV ?= .venv-infra-hcl2

.PHONY: infra-tools infra-check constraints images compile upload schedule render deploy \
	deploy-prereqs tf-apply credentials kfp-install trainer-install secrets apply wait urls destroy

# --- prerequisite checks: each missing piece is named with what to do -----------------------------------------
need_gcloud = command -v gcloud >/dev/null 2>&1 || { echo "missing: gcloud. Install the Google Cloud CLI, then run 'gcloud auth login' and 'gcloud auth application-default login'." >&2; missing=1; };
need_auth_plugin = command -v gke-gcloud-auth-plugin >/dev/null 2>&1 || { echo "missing: gke-gcloud-auth-plugin. Run 'gcloud components install gke-gcloud-auth-plugin' (kubectl needs it for GKE)." >&2; missing=1; };
need_terraform = command -v terraform >/dev/null 2>&1 || { echo "missing: terraform. Install Terraform 1.6 or newer from developer.hashicorp.com/terraform/install." >&2; missing=1; };
need_kubectl = command -v kubectl >/dev/null 2>&1 || { echo "missing: kubectl. Run 'gcloud components install kubectl' or install it from kubernetes.io/docs/tasks/tools." >&2; missing=1; };
need_openssl = command -v openssl >/dev/null 2>&1 || { echo "missing: openssl (generates the MLflow passwords). Install it with your package manager." >&2; missing=1; };
need_project = [ -n "$(PROJECT_ID)" ] || { echo "missing: PROJECT_ID. Pass your Google Cloud project: make $@ PROJECT_ID=my-project" >&2; missing=1; };

# Runs $(1) with $$host set to the KFP API: KFP_HOST if given, else a temporary port-forward to the in-cluster UI.
define with_kfp
	@if [ -n "$(KFP_HOST)" ]; then host="$(KFP_HOST)"; $(1); else \
	  kubectl -n kubeflow port-forward svc/ml-pipeline-ui $(KFP_LOCAL_PORT):80 >/dev/null 2>&1 & pf=$$!; \
	  trap 'kill $$pf 2>/dev/null' EXIT; host="http://localhost:$(KFP_LOCAL_PORT)"; \
	  for i in $$(seq 30); do curl -fsS "$$host/apis/v2beta1/healthz" >/dev/null 2>&1 && break; sleep 1; done; \
	  $(1); fi
endef

# --- offline checks --------------------------------------------------------------------------------------------
$(INFRA_VENV)/.installed: requirements/infra-tools.txt
	rm -rf $(INFRA_VENV)
	$(PYTHON) -m venv $(INFRA_VENV)
	$(INFRA_VENV)/bin/pip install -q -r requirements/infra-tools.txt
	$(INFRA_VENV)/bin/pip check
	touch $@

$(HCL_VENV)/.installed: requirements/infra-hcl2.txt
	rm -rf $(HCL_VENV)
	$(PYTHON) -m venv $(HCL_VENV)
	$(HCL_VENV)/bin/pip install -q -r requirements/infra-hcl2.txt
	$(HCL_VENV)/bin/pip check
	touch $@

infra-tools: $(INFRA_VENV)/.installed $(HCL_VENV)/.installed ## install checkov, hadolint, kubernetes-validate, python-hcl2 (own venvs, idempotent)

infra-check: setup infra-tools ## offline checks: kustomize render, schemas, checkov, hadolint, terraform fmt/parse, make targets
	$(VENV)/bin/pytest -m infra tests/infra $(PYTEST_ARGS)

render: ## render every kustomize overlay into build/manifests/OVERLAY.yaml (offline)
	@mkdir -p build/manifests
	@for overlay in $(OVERLAYS); do \
	  kubectl kustomize manifests/overlays/$$overlay > build/manifests/$$overlay.yaml || exit 1; \
	  echo "build/manifests/$$overlay.yaml"; \
	done

constraints: setup ## regenerate images/constraints.txt from the tested .venv (after changing pins in pyproject.toml)
	{ echo "# Constraints for the images: the exact versions of the tested environment (.venv), so every image resolves"; \
	  echo "# the same stack. Regenerate with \`make constraints\` after changing pyproject.toml and rebuilding .venv."; \
	  echo "# torch is listed without its local tag (+cpu): the CPU image takes 2.13.0+cpu, the GPU image PyPI's CUDA build."; \
	  $(VENV)/bin/pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' | sed -E 's/\+cpu$$//' | LC_ALL=C sort -f; \
	} > images/constraints.txt

# --- images and the pipeline -----------------------------------------------------------------------------------
images: ## build and push the CPU, GPU and MLflow images tagged TAG (targets of images/Dockerfile; Docker if an engine answers, else Cloud Build)
	@missing=0; $(need_project) exit $$missing
	@if [ -n "$$(git status --porcelain)" ] && [ "$(ALLOW_DIRTY)" != "yes" ]; then \
	  echo "error: the working tree has uncommitted changes, so tag $(TAG) would not describe the images. Commit, or pass ALLOW_DIRTY=yes." >&2; exit 1; fi
	@if docker info >/dev/null 2>&1; then \
	  set -e; \
	  docker build --file images/Dockerfile --target cpu --build-arg TORCH_VERSION=$(TORCH_VERSION) --tag $(CPU_IMAGE) .; \
	  docker build --file images/Dockerfile --target gpu --build-arg TORCH_VERSION=$(TORCH_VERSION) --tag $(GPU_IMAGE) .; \
	  docker build --file images/Dockerfile --target mlflow --tag $(MLFLOW_IMAGE) .; \
	  docker push $(CPU_IMAGE); docker push $(GPU_IMAGE); docker push $(MLFLOW_IMAGE); \
	else \
	  command -v gcloud >/dev/null 2>&1 || { echo "error: no Docker engine answers and gcloud is not installed: start Docker, or install the Google Cloud CLI to build with Cloud Build." >&2; exit 1; }; \
	  gcloud builds submit --project $(PROJECT_ID) --region $(REGION) --config images/cloudbuild.yaml \
	    --service-account projects/$(PROJECT_ID)/serviceAccounts/$(BUILD_SA) \
	    --gcs-source-staging-dir gs://$(ARTIFACTS_BUCKET)/cloudbuild-source \
	    --substitutions _REGISTRY=$(REGISTRY),_TAG=$(TAG),_TORCH_VERSION=$(TORCH_VERSION) . ; \
	fi

compile: setup ## compile the pipeline into build/sft_pipeline.yaml with the images of TAG and the checkpoint volume
	@missing=0; $(need_project) exit $$missing
	@mkdir -p $(dir $(PIPELINE_FILE))
	$(KUBETUNE) pipeline compile --out $(PIPELINE_FILE) --cpu-image $(CPU_IMAGE) --gpu-image $(GPU_IMAGE) \
	  --checkpoint-pvc $(CHECKPOINT_PVC) --checkpoint-gcsfuse

upload: ## upload build/sft_pipeline.yaml to Kubeflow Pipelines (KFP_HOST, or a port-forward to the cluster)
	@test -f $(PIPELINE_FILE) || { echo "error: $(PIPELINE_FILE) is missing: run 'make compile' first." >&2; exit 1; }
	$(call with_kfp,$(KUBETUNE) pipeline upload --host "$$host" --file $(PIPELINE_FILE))

schedule: ## recurring fine-tune: make schedule CONFIG=configs/x.yaml [CRON="0 3 * * 0"] [KFP_HOST=...]
	@test -n "$(CONFIG)" || { echo "error: set CONFIG to the run's kubetune config, e.g. make schedule CONFIG=configs/lima/x.yaml" >&2; exit 1; }
	$(call with_kfp,$(KUBETUNE) pipeline schedule --host "$$host" --cron "$(CRON)" --config $(CONFIG))

# --- deploy ------------------------------------------------------------------------------------------------------
deploy: ## stand it all up: terraform, credentials, images (or TAG=...), KFP, Trainer, manifests, wait, compile, upload, URLs
	@$(MAKE) --no-print-directory deploy-prereqs
	$(MAKE) --no-print-directory tf-apply
	$(MAKE) --no-print-directory credentials
	$(if $(filter command line environment,$(origin TAG)),@echo "using the images already pushed with tag $(TAG)",$(MAKE) --no-print-directory images)
	$(MAKE) --no-print-directory kfp-install
	$(MAKE) --no-print-directory trainer-install
	$(MAKE) --no-print-directory secrets
	$(MAKE) --no-print-directory apply
	$(MAKE) --no-print-directory wait
	$(MAKE) --no-print-directory compile
	$(MAKE) --no-print-directory upload
	$(MAKE) --no-print-directory urls

deploy-prereqs: ## check gcloud, terraform, kubectl, openssl and PROJECT_ID; name what is missing and how to get it
	@missing=0; $(need_gcloud) $(need_auth_plugin) $(need_terraform) $(need_kubectl) $(need_openssl) $(need_project) \
	  exit $$missing

tf-apply: ## terraform init + apply in terraform/envs/TF_ENV (asks before changing anything unless AUTO_APPROVE=yes)
	@missing=0; $(need_terraform) $(need_project) exit $$missing
	terraform -chdir=$(TF_DIR) init -input=false
	terraform -chdir=$(TF_DIR) apply -input=false $(if $(filter yes,$(AUTO_APPROVE)),-auto-approve) \
	  -var project_id=$(PROJECT_ID) -var region=$(REGION)

credentials: ## point kubectl at the cluster (through its DNS endpoint, IAM-authorised)
	gcloud container clusters get-credentials "$$(terraform -chdir=$(TF_DIR) output -raw cluster_name)" \
	  --location $(REGION) --project $(PROJECT_ID) --dns-endpoint

kfp-install: ## install Kubeflow Pipelines standalone, pinned in manifests/kfp (cluster-scoped part first)
	kubectl apply -k manifests/kfp/cluster-scoped
	kubectl wait --for condition=established --timeout=120s crd/applications.app.k8s.io
	kubectl apply -k manifests/kfp

# Server-side: Trainer's CRDs are too large for the last-applied annotation of a client-side apply. The runtimes
# (manifests/base/trainer, applied by `apply`) need the CRDs established and Trainer's validating webhook answering.
trainer-install: ## install Kubeflow Trainer and JobSet, pinned in manifests/trainer (before `apply` ships the runtimes)
	kubectl apply --server-side -k manifests/trainer
	kubectl wait --for condition=established --timeout=120s crd/trainjobs.trainer.kubeflow.org \
	  crd/clustertrainingruntimes.trainer.kubeflow.org crd/jobsets.jobset.x-k8s.io
	kubectl -n kubeflow-system wait --for=condition=Available deployment --all --timeout=10m

secrets: ## create the Secrets that never live in git: database, MLflow admin and pipeline users, hub token
# Values travel through env files on process substitution, never on a command line (where `ps` would show them).
	kubectl create namespace kubetune --dry-run=client -o yaml | kubectl apply -f -
	kubectl -n kubetune create secret generic mlflow-db \
	  --from-env-file=<(printf 'password=%s\n' "$$(terraform -chdir=$(TF_DIR) output -raw mlflow_db_password)") \
	  --dry-run=client -o yaml | kubectl apply -f -
	kubectl -n kubetune get secret mlflow-auth >/dev/null 2>&1 || kubectl -n kubetune create secret generic mlflow-auth \
	  --from-env-file=<(printf 'MLFLOW_AUTH_ADMIN_USERNAME=admin\nMLFLOW_AUTH_ADMIN_PASSWORD=%s\nMLFLOW_FLASK_SERVER_SECRET_KEY=%s\n' \
	    "$$(openssl rand -hex 24)" "$$(openssl rand -hex 32)")
	kubectl -n kubeflow get secret mlflow-client >/dev/null 2>&1 || { password="$$(openssl rand -hex 24)"; \
	  for ns in kubetune kubeflow; do kubectl -n $$ns create secret generic mlflow-client \
	    --from-env-file=<(printf 'MLFLOW_TRACKING_USERNAME=kubetune-pipeline\nMLFLOW_TRACKING_PASSWORD=%s\n' "$$password") \
	    --dry-run=client -o yaml | kubectl apply -f - || exit 1; done; }
	@if [ -n "$$HF_TOKEN" ]; then \
	  kubectl -n kubeflow create secret generic hf-token --from-env-file=<(printf 'HF_TOKEN=%s\n' "$$HF_TOKEN") \
	    --dry-run=client -o yaml | kubectl apply -f -; \
	elif ! kubectl -n kubeflow get secret hf-token >/dev/null 2>&1; then \
	  kubectl -n kubeflow create secret generic hf-token --from-literal=HF_TOKEN=; \
	  echo "note: hf-token holds no token; for gated models rerun with HF_TOKEN=hf_... in the environment: make secrets"; \
	fi

apply: ## apply manifests/overlays/ENV with terraform's values and the MLflow image of TAG
	@missing=0; $(need_project) exit $$missing
	rm -rf $(DEPLOY_DIR) && mkdir -p $(DEPLOY_DIR)
	cp -R manifests $(DEPLOY_DIR)/manifests
	terraform -chdir=$(TF_DIR) output -raw kubetune_infra_env > $(DEPLOY_DIR)/manifests/base/infra.env
	printf '%s\n' 'apiVersion: kustomize.config.k8s.io/v1beta1' 'kind: Kustomization' 'resources:' \
	  '  - manifests/overlays/$(ENV)' 'images:' '  - name: kubetune-mlflow' '    newName: $(REGISTRY)/kubetune-mlflow' \
	  '    newTag: "$(TAG)"' > $(DEPLOY_DIR)/kustomization.yaml
# Jobs are immutable: the bootstrap Job is replaced on every deploy (it is idempotent).
	kubectl -n kubetune delete job mlflow-bootstrap-users --ignore-not-found
	kubectl apply -k $(DEPLOY_DIR)

wait: ## wait until Kubeflow Pipelines and MLflow are available and the MLflow users exist
	kubectl -n kubeflow wait --for=condition=Available deployment --all --timeout=15m
	$(if $(filter dev,$(ENV)),kubectl -n kubetune rollout status statefulset/postgres --timeout=10m)
	kubectl -n kubetune rollout status deployment/mlflow --timeout=10m
	kubectl -n kubetune wait --for=condition=complete job/mlflow-bootstrap-users --timeout=10m

urls: ## print how to reach the Kubeflow Pipelines and MLflow UIs (both stay inside the cluster)
	@echo "Kubeflow Pipelines UI: kubectl -n kubeflow port-forward svc/ml-pipeline-ui $(KFP_LOCAL_PORT):80   then open http://localhost:$(KFP_LOCAL_PORT)"
	@echo "MLflow UI:             kubectl -n kubetune port-forward svc/mlflow 5000:5000   then open http://localhost:5000"
	@echo "MLflow admin password: kubectl -n kubetune get secret mlflow-auth -o jsonpath='{.data.MLFLOW_AUTH_ADMIN_PASSWORD}' | base64 -d"

destroy: ## delete the cloud resources of terraform/envs/TF_ENV; asks for the project id unless CONFIRM=yes
	@missing=0; $(need_terraform) $(need_project) exit $$missing
	@if [ "$(CONFIRM)" != "yes" ]; then \
	  printf 'This deletes the cluster, the database and the registry of project %s (terraform/envs/%s).\nType the project id to confirm: ' "$(PROJECT_ID)" "$(TF_ENV)"; \
	  read -r answer || answer=; \
	  [ "$$answer" = "$(PROJECT_ID)" ] || { echo "aborted: nothing was destroyed." >&2; exit 1; }; \
	fi
	terraform -chdir=$(TF_DIR) destroy -input=false -auto-approve -var project_id=$(PROJECT_ID) -var region=$(REGION)
