"""Build the KFP components for a pair of images.

``@dsl.component`` fixes ``base_image`` when it runs, so the components are made here, from the plain
functions in :mod:`components.stages`, once the images are known (at compile time). kfp is baked into the
images, hence ``install_kfp_package=False``: a task starts without a pip install and runs exactly the kfp the
image was built with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kfp import dsl

from components import stages
from components.params import BY_NAME


@dataclass(frozen=True)
class Components:
    """The pipeline's components (``prepare``/``prepare_fresh``, ``train_cpu``/``train_gpu`` share a body)."""

    prepare: Any
    prepare_fresh: Any
    check_unchanged: Any
    pack: Any
    train_cpu: Any
    train_gpu: Any
    evaluate: Any
    register: Any


def _component(func: Any, image: str, name: str | None = None) -> Any:
    component = dsl.component(func, base_image=image, install_kfp_package=False)
    if name is not None:
        # Two components from one function need two names, or the compiler calls the second `<name>-2`. The
        # name only labels the spec; the container still runs `func` (--function_to_execute).
        component.component_spec.name = name
        component.name = name
    for input_name, spec in (component.component_spec.inputs or {}).items():
        if not spec.description and input_name in BY_NAME:
            spec.description = BY_NAME[input_name].doc
    return component


def build(cpu_image: str, gpu_image: str) -> Components:
    """Components whose containers run ``cpu_image`` (every step) or ``gpu_image`` (GPU training)."""
    return Components(
        prepare=_component(stages.prepare, cpu_image),
        prepare_fresh=_component(stages.prepare, cpu_image, name="prepare-fresh"),
        check_unchanged=_component(stages.check_unchanged, cpu_image),
        pack=_component(stages.pack, cpu_image),
        train_cpu=_component(stages.train, cpu_image, name="train-cpu"),
        train_gpu=_component(stages.train, gpu_image, name="train-gpu"),
        evaluate=_component(stages.evaluate, cpu_image),
        register=_component(stages.register, cpu_image),
    )
