"""The supervised fine-tuning pipeline: prepare -> pack -> train -> evaluate -> register.

Graph (task names as compiled; display names in the UI in brackets)::

    refresh_data?  prepare-fresh [Prepare data (fresh read)]   |  prepare [Prepare data]  (cached)
                                        \\_____ prepared_dataset (dsl.OneOf) _____/
    check-unchanged [Check for new data]            verdict `unchanged` (and no force): the run ends here
    pack [Pack]                                     (cached)
    accelerator?   train-gpu [Train on GPU]  |  train-cpu [Train on CPU (C3)]      retries with backoff
                   (train_nodes > 1: the task runs a Kubeflow Trainer TrainJob on its pool, pipelines/trainjob.py)
                            \\_____ adapter (dsl.OneOf) _____/
    evaluate [Evaluate]  ->  register [Register]

Placement (:mod:`pipelines.placement`): every task on the C3 CPU pool except ``train-gpu``, the only task that
asks for a GPU. Caching: on for ``prepare`` and ``pack`` (an identical re-run reuses them), off for the rest,
whose results depend on things outside their inputs (the champion, the tracking server, the clock).
Checkpoints go to ``<checkpoint_root>/<run id>``, stable across retries of the run's train task. Secrets never
enter the spec: ``HF_TOKEN`` comes from the Secret ``hf-token`` and ``MLFLOW_TRACKING_URI`` from the ConfigMap
``kubetune-settings``, both resolved by Kubernetes when the pod starts.
"""

import inspect
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

from components.factory import build
from components.params import BY_NAME, CONFIG_KEYS, PARAMS, defaults
from components.runtime import UNCHANGED
from kubetune import dag
from kubetune.errors import UserError
from pipelines import placement
from pipelines.images import Images, default_images

PIPELINE_NAME = "kubetune-sft"
PIPELINE_DESCRIPTION = (
    "LoRA / QLoRA supervised fine-tuning: prepare -> pack -> train (C3 CPU or GPU) -> "
    "evaluate -> register in MLflow with a promotion gate."
)

# The HF_TOKEN Secret, the settings ConfigMap, the checkpoint mount and the GCS FUSE annotation are defined in
# pipelines.placement (the TrainJob of a multi-node run gives its pods the same ones) and named here too.
HF_SECRET = placement.HF_SECRET
SETTINGS_CONFIGMAP = placement.SETTINGS_CONFIGMAP
GCSFUSE_ANNOTATION = placement.GCSFUSE_ANNOTATION
CHECKPOINT_MOUNT = placement.CHECKPOINT_MOUNT
# MLflow's basic-auth user for the pipeline (created by `make secrets`), for the tasks that talk to MLflow.
MLFLOW_SECRET = ("mlflow-client", ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))

# Preemptible (Spot) nodes: a preempted train pod saves a checkpoint on SIGTERM and exits 3; KFP starts it
# again after 1, 2, 4 minutes. The retry window must outlast a long training run, hence 24h (Argo's default is
# 1h).
TRAIN_RETRY = {
    "num_retries": 3,
    "backoff_duration": "60s",
    "backoff_factor": 2.0,
    "backoff_max_duration": "24h",
}

# Tasks that download from the Hugging Face hub get the token (gated models and datasets); the rest do not.
_HUB_TASKS = {"prepare", "prepare-fresh", "pack", "train-cpu", "train-gpu", "evaluate"}
# Tasks that read or write the MLflow tracking server.
_MLFLOW_TASKS = {"check-unchanged", "register"}


def _signature(checkpoint_root: str) -> inspect.Signature:
    """The pipeline's parameters, one per :data:`components.params.PARAMS` entry, with its type and run-form
    default (:func:`components.params.defaults`: the library's config defaults, and the form presets)."""
    form = {**defaults(), "checkpoint_root": checkpoint_root}
    return inspect.Signature(
        [
            inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=form[p.name], annotation=p.type)
            for p in PARAMS
        ]
    )


def _docstring() -> str:
    args = "\n".join(f"    {p.name}: {p.doc}" for p in PARAMS)
    return f"{PIPELINE_DESCRIPTION}\n\nArgs:\n{args}\n"


def _task(task: Any, *, stage: str, display: str, cache: bool, gpu: bool = False) -> Any:
    task.set_display_name(display)
    task.set_caching_options(cache)
    if gpu:
        placement.on_gpu(task)
    else:
        placement.on_pool(task, "cpu")
    placement.size(task, stage)
    placement.label(task, stage)
    kubernetes.use_config_map_as_env(
        task, SETTINGS_CONFIGMAP[0], {SETTINGS_CONFIGMAP[1]: SETTINGS_CONFIGMAP[1]}, optional=True
    )
    if stage in _HUB_TASKS:
        # optional: public models and datasets need no token, and a missing Secret must not block the pod.
        kubernetes.use_secret_as_env(task, HF_SECRET[0], {HF_SECRET[1]: HF_SECRET[1]}, optional=True)
    if stage in _MLFLOW_TASKS:
        # optional: a tracking server without authentication needs no credentials.
        kubernetes.use_secret_as_env(task, MLFLOW_SECRET[0], {k: k for k in MLFLOW_SECRET[1]}, optional=True)
    return task


def build_pipeline(
    images: Images | None = None, *, checkpoint_pvc: str | None = None, checkpoint_gcsfuse: bool = False
) -> Any:
    """The pipeline for ``images`` (default: :func:`pipelines.images.default_images`).

    ``checkpoint_pvc``: a PersistentVolumeClaim mounted at :data:`CHECKPOINT_MOUNT` in the train pods, which
    then becomes the default of the ``checkpoint_root`` parameter. ``checkpoint_gcsfuse``: the claim is a GCS
    bucket through the GCS FUSE CSI driver, so the train pods get the annotation that makes GKE add its sidecar.
    """
    if checkpoint_gcsfuse and not checkpoint_pvc:
        raise UserError("--checkpoint-gcsfuse needs --checkpoint-pvc (the claim bound to the bucket)")
    images = images or default_images()
    c = build(images.cpu, images.gpu)
    checkpoint_default = CHECKPOINT_MOUNT if checkpoint_pvc else ""

    def sft_pipeline(*values: Any) -> None:
        # KFP calls this with one pipeline channel per parameter, in the order of the signature set below.
        p = dict(zip(BY_NAME, values, strict=True))
        base = {"config_yaml": p["config_yaml"], "overrides": p["overrides"]}
        config = {**base, **{name: p[name] for name in CONFIG_KEYS}}
        produced: dict[str, Any] = {}  # stage -> its output artifact (channel), as dag.STAGES names them

        def reads(stage: str) -> dict[str, Any]:
            """The artifact inputs of ``stage``'s component: the outputs of the stages it reads."""
            return {dag.BY_NAME[name].artifact: produced[name] for name in dag.BY_NAME[stage].inputs}

        def output(task: Any, stage: str) -> Any:
            return task.outputs[dag.BY_NAME[stage].artifact]

        prepare_args = {"dataset": p["dataset"], "eval_size": p["eval_size"], **base}
        with dsl.If(p["refresh_data"] == True, name="refresh-data"):  # noqa: E712 - builds a KFP condition
            fresh = _task(
                c.prepare_fresh(**prepare_args), stage="prepare", display="Prepare data (fresh read)", cache=False
            )
        with dsl.Else(name="reuse-cached-data"):
            cached = _task(c.prepare(**prepare_args), stage="prepare", display="Prepare data", cache=True)
        produced["prepare"] = dsl.OneOf(output(fresh, "prepare"), output(cached, "prepare"))

        check = _task(
            c.check_unchanged(
                prepared_dataset=produced["prepare"], accelerator=p["accelerator"], force=p["force"], **config
            ),
            stage="check-unchanged",
            display="Check for new data",
            cache=False,
        )

        with dsl.If(check.outputs["Output"] != UNCHANGED, name="data-changed"):
            pack = _task(
                c.pack(**reads("pack"), model=p["model"], max_length=p["max_length"], **base),
                stage="pack",
                display="Pack",
                cache=True,
            )
            produced["pack"] = output(pack, "pack")
            train_args = {
                **reads("train"),
                "checkpoint_root": p["checkpoint_root"],
                "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                "train_nodes": p["train_nodes"],
                # Compile-time facts the task hands to its TrainJob when train_nodes > 1 (pipelines/trainjob.py).
                "checkpoint_pvc": checkpoint_pvc or "",
                "checkpoint_gcsfuse": checkpoint_gcsfuse,
                **config,
            }
            with dsl.If(p["accelerator"] == "gpu", name="train-on-gpu"):
                on_gpu = _task(
                    c.train_gpu(**train_args, train_pool="gpu", train_image=images.gpu),
                    stage="train-gpu",
                    display="Train on GPU",
                    cache=False,
                    gpu=True,
                )
            with dsl.Else(name="train-on-cpu"):
                on_cpu = _task(
                    c.train_cpu(**train_args, train_pool="cpu", train_image=images.cpu),
                    stage="train-cpu",
                    display="Train on CPU (C3)",
                    cache=False,
                )
            for train in (on_gpu, on_cpu):
                train.set_retry(**TRAIN_RETRY)
                if checkpoint_pvc:
                    kubernetes.mount_pvc(train, pvc_name=checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
                if checkpoint_gcsfuse:
                    kubernetes.add_pod_annotation(train, *GCSFUSE_ANNOTATION)
            produced["train"] = dsl.OneOf(output(on_gpu, "train"), output(on_cpu, "train"))

            evaluate = _task(
                c.evaluate(**reads("evaluate"), **config), stage="evaluate", display="Evaluate", cache=False
            )
            produced["evaluate"] = output(evaluate, "evaluate")
            _task(c.register(**reads("register"), **config), stage="register", display="Register", cache=False)

    sft_pipeline.__signature__ = _signature(checkpoint_default)
    sft_pipeline.__doc__ = _docstring()
    return dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)(sft_pipeline)


def compile_pipeline(
    out: str | Path,
    images: Images | None = None,
    *,
    checkpoint_pvc: str | None = None,
    checkpoint_gcsfuse: bool = False,
) -> Path:
    """Compile the pipeline to ``out`` (YAML, the file KFP uploads); returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(images, checkpoint_pvc=checkpoint_pvc, checkpoint_gcsfuse=checkpoint_gcsfuse)
    compiler.Compiler().compile(pipeline, package_path=str(out))
    return out
