#!/usr/bin/env bash
# Makes a LOCAL STAND-IN for the CPU images' base (python:3.11.14-slim-bookworm), for machines that cannot pull
# from Docker Hub: a Debian bookworm root made by debootstrap from Debian's own registry, with Debian's Python 3.11,
# `python` and `pip` on PATH as in the real base, committed to buildah's store as
#   localhost/kubetune-standin/python:3.11-slim-bookworm   (override with STANDIN_IMAGE)
# It is NOT the cloud base: Debian's python3 (3.11.2) instead of the python.org 3.11.14 build under /usr/local.
# `make images-local` builds images/Dockerfile on it with `--build-arg PYTHON_BASE=<this image>`; the cloud build
# keeps the digest-pinned default. Needs root, buildah and debootstrap (apt-get install -y buildah debootstrap).
set -euo pipefail
image="${STANDIN_IMAGE:-localhost/kubetune-standin/python:3.11-slim-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
[ "$(id -u)" = 0 ] || { echo "images/local-base.sh: needs root (debootstrap and buildah's chroot isolation)." >&2; exit 1; }
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "images/local-base.sh: $tool is missing: apt-get install -y buildah debootstrap" >&2; exit 1; }
done
if [ "${FORCE:-}" != yes ] && buildah inspect --type image "$image" >/dev/null 2>&1; then
  echo "$image exists (FORCE=yes remakes it)"; exit 0
fi
ctr="$(buildah from scratch)"
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
root="$(buildah mount "$ctr")"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$root" "$mirror"
# The real base has `python` and `pip` on PATH and lets pip install into the system interpreter.
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*
buildah umount "$ctr" >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
  --cmd python3 \
  --label org.opencontainers.image.title=kubetune-standin-python \
  --label "org.opencontainers.image.description=LOCAL STAND-IN for python:3.11.14-slim-bookworm (debootstrap bookworm, Debian's Python 3.11); never pushed" \
  "$ctr"
buildah commit --rm "$ctr" "$image"
trap - EXIT
echo "$image"
