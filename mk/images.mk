# Images built and tested on this machine, with no Docker engine and no registry access: buildah on a debootstrap
# stand-in for the CPU base (images/local-base.sh, images/local-build.sh). Included by the root Makefile.
# The Dockerfile is the cloud build's (images/Dockerfile); only PYTHON_BASE, TORCH_INDEX_URL and build-time mounts
# differ. Needs root, buildah and debootstrap (apt-get install -y buildah debootstrap).
.PHONY: images-base images-local images-gpu-local test-images

images-base: ## make the local stand-in base image (debootstrap bookworm + Debian's Python 3.11; never pushed)
	images/local-base.sh

images-local: ## build the cpu and mlflow targets with buildah on the stand-in base (cached; tag = hash of the inputs)
	images/local-build.sh cpu mlflow

images-gpu-local: ## the GPU image's Python layers (gpu-app: PyPI's CUDA torch, bitsandbytes) on the stand-in; no CUDA base
	images/local-build.sh gpu-app

test-images: setup quickstart-model ## the images tier: build the CPU image, run every component's command in it
	$(VENV)/bin/pytest -m images tests/images $(PYTEST_ARGS)
