"""Which container image every step runs in: chosen once, at compile time.

Two images, built from this tree (images/Dockerfile, targets ``cpu`` and ``gpu``) with kubetune and kfp
installed: the CPU image runs every step except GPU training. The references are set when the pipeline is compiled
(``kubetune pipeline compile --cpu-image REF --gpu-image REF``, which ``make compile`` calls with the
registry's references); the defaults below are local names for a cluster that loads images directly (kind,
minikube). Nothing here reads the environment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kubetune.errors import UserError

CPU_IMAGE_NAME = "kubetune-cpu"
GPU_IMAGE_NAME = "kubetune-gpu"

# [registry[:port]/]path[:tag][@sha256:digest], lower-case path components as the OCI distribution spec
# requires.
_REFERENCE = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)


@dataclass(frozen=True)
class Images:
    """Image references: ``cpu`` for every step but GPU training, ``gpu`` for GPU training."""

    cpu: str
    gpu: str

    def __post_init__(self) -> None:
        for flag, ref in (("--cpu-image", self.cpu), ("--gpu-image", self.gpu)):
            check_reference(ref, flag)


def check_reference(ref: str, what: str = "image") -> str:
    """``ref`` if it is a valid image reference, else a UserError naming ``what``."""
    if not isinstance(ref, str) or not _REFERENCE.match(ref):
        raise UserError(
            f"{what} {ref!r}: not an image reference; expected e.g. "
            f"us-central1-docker.pkg.dev/PROJECT/kubetune/{CPU_IMAGE_NAME}:0.1.0"
        )
    return ref


def default_images(tag: str | None = None) -> Images:
    """Local image names tagged with the installed kubetune version (or ``tag``)."""
    if tag is None:
        from kubetune.artifacts import version

        tag = version().replace("+", "-")
    return Images(cpu=f"{CPU_IMAGE_NAME}:{tag}", gpu=f"{GPU_IMAGE_NAME}:{tag}")
