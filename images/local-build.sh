#!/usr/bin/env bash
# Builds images/Dockerfile targets with buildah on the local stand-in base (images/local-base.sh), for machines with
# no Docker engine and no access to Docker Hub or PyTorch's index. `make images-local` and the images test tier
# (tests/images) run it.  Usage: images/local-build.sh TARGET...   (cpu, mlflow, gpu-app)
#
# The Dockerfile is the cloud build's, unchanged; only build arguments and build-time mounts differ:
#   PYTHON_BASE      the stand-in instead of the digest-pinned python image
#   TORCH_INDEX_URL  a one-package index (file:///torch-index) over the torch CPU wheel on this machine's disk
#                    ($TORCH_WHEEL_DIR, default /opt/wheels), mounted read-only at /wheels
#   /etc/pip.conf    names this machine's certificate bundle, mounted read-only, so pip reaches PyPI through it
#   GPU_PYTHON       gpu-python-base: the GPU stack goes into a venv of the base's Python 3.11, because the
#                    python-build-standalone interpreter (GitHub) cannot be downloaded here. gpu-app is the GPU
#                    image's Python layers (PyPI's CUDA torch, bitsandbytes) on the stand-in: the CUDA base and
#                    the runtime stage are not built.
# Mounts exist only while a RUN step runs; nothing of them is committed. The image format is Docker's, as a Docker
# or Cloud Build build makes: the OCI format would drop SHELL (bash -o pipefail) and HEALTHCHECK.
#
# Each image is tagged localhost/kubetune-TARGET:local-HASH, HASH a digest of every input of the build (the files
# of the build context, the Dockerfile, this script, the base image's id, the torch wheel), and :local. An image whose tag
# exists is not rebuilt; otherwise buildah's layer cache (--layers) rebuilds only what changed. Prints one line per
# target: the image reference.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: images/local-build.sh TARGET... (cpu, mlflow, gpu-app)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "images/local-build.sh: needs root (buildah --isolation chroot)." >&2; exit 1; }
command -v buildah >/dev/null || { echo "images/local-build.sh: buildah is missing: apt-get install -y buildah debootstrap" >&2; exit 1; }

base="${STANDIN_IMAGE:-localhost/kubetune-standin/python:3.11-slim-bookworm}"
STANDIN_IMAGE="$base" images/local-base.sh >&2
torch="$(sed -n 's/.*"torch==\([^"]*\)".*/\1/p' pyproject.toml)"
wheels="${TORCH_WHEEL_DIR:-/opt/wheels}"
wheel="$(find "$wheels" -maxdepth 1 -name "torch-${torch}+cpu-cp311-*.whl" -printf '%f\n' 2>/dev/null | sort | tail -1)"
[ -n "$wheel" ] || { echo "images/local-build.sh: no torch ${torch}+cpu wheel for Python 3.11 in $wheels: set TORCH_WHEEL_DIR to the folder that holds it." >&2; exit 1; }
ca="${PIP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
[ -r "$ca" ] || { echo "images/local-build.sh: certificate bundle $ca is not readable: set PIP_CA_BUNDLE." >&2; exit 1; }

work="build/images-local"
mkdir -p "$work/torch-index/torch"
printf '<!DOCTYPE html><html><body><a href="file:///wheels/%s">%s</a></body></html>\n' \
  "${wheel//+/%2B}" "$wheel" > "$work/torch-index/torch/index.html"
printf '[global]\ncert = /etc/ssl/certs/build-host-ca.crt\n' > "$work/pip.conf"

# The build context is what .dockerignore lets through; these are its files.
inputs="$(find pyproject.toml README* src pipelines components images/Dockerfile images/constraints.txt \
  images/mlflow/requirements.txt images/local-build.sh -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' \
  | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)"
hash="$(printf '%s %s %s\n' "$inputs" "$(buildah inspect --type image --format '{{.FromImageID}}' "$base")" "$wheel" \
  | sha256sum | cut -c1-12)"

for target in "$@"; do
  image="localhost/kubetune-${target}:local-${hash}"
  if buildah inspect --type image "$image" >/dev/null 2>&1; then
    echo "$image is up to date" >&2
  else
    start=$(date +%s)
    buildah bud --layers --isolation chroot --format docker --target "$target" --file images/Dockerfile \
      --build-arg "PYTHON_BASE=$base" --build-arg "TORCH_VERSION=$torch" \
      --build-arg TORCH_INDEX_URL=file:///torch-index --build-arg GPU_PYTHON=gpu-python-base \
      -v "$PWD/$work/torch-index:/torch-index:ro" -v "$wheels:/wheels:ro" \
      -v "$PWD/$work/pip.conf:/etc/pip.conf:ro" -v "$ca:/etc/ssl/certs/build-host-ca.crt:ro" \
      --tag "$image" --tag "localhost/kubetune-${target}:local" . >&2
    echo "built $image in $(( $(date +%s) - start )) s" >&2
  fi
  echo "$image"
done
