"""The supervised fine-tuning pipeline: prepare -> pack -> train -> evaluate -> register.

Graph (task names as compiled; display names in the UI in brackets)::

    refresh_data?  prepare-fresh [Prepare data (fresh read)]   |  prepare [Prepare data]  (cached)
                                        \\_____ prepared_dataset (dsl.OneOf) _____/
    check-unchanged [Check for new data]            verdict `unchanged` (and no force): the run ends here
    pack [Pack]                                     (cached)
    accelerator?   train-gpu [Train on GPU]  |  train-cpu [Train on CPU (C3)]      retries with backoff
                            \\_____ adapter (dsl.OneOf) _____/
    evaluate [Evaluate]  ->  register [Register]

Placement (:mod:`pipelines.placement`): every task on the C3 CPU pool except ``train-gpu``, the only task that
asks for a GPU. Caching: on for ``prepare`` and ``pack`` (an identical re-run reuses them), off for the rest,
whose results depend on things outside their inputs (the champion, the tracking server, the clock).
Checkpoints go to ``<checkpoint_root>/<run id>``, stable across retries of the run's train task. Secrets never
enter the spec: ``HF_TOKEN`` comes from the Secret ``hf-token`` and ``MLFLOW_TRACKING_URI`` from the ConfigMap
``kubetune-settings``, both resolved by Kubernetes when the pod starts.
"""

from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

from components.factory import build
from components.params import PARAMS
from components.runtime import UNCHANGED
from kubetune.errors import UserError
from pipelines import placement
from pipelines.images import Images, default_images

PIPELINE_NAME = "kubetune-sft"
PIPELINE_DESCRIPTION = (
    "LoRA / QLoRA supervised fine-tuning: prepare -> pack -> train (C3 CPU or GPU) -> "
    "evaluate -> register in MLflow with a promotion gate."
)

HF_SECRET = ("hf-token", "HF_TOKEN")  # Secret name, key (exposed to the pod as env HF_TOKEN)
SETTINGS_CONFIGMAP = ("kubetune-settings", "MLFLOW_TRACKING_URI")  # ConfigMap name, key (same env name)
# MLflow's basic-auth user for the pipeline (created by `make secrets`), for the tasks that talk to MLflow.
MLFLOW_SECRET = ("mlflow-client", ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
GCSFUSE_ANNOTATION = ("gke-gcsfuse/volumes", "true")  # GKE injects the GCS FUSE sidecar into such pods
CHECKPOINT_MOUNT = "/mnt/kubetune-checkpoints"  # where --checkpoint-pvc is mounted in the train pods

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

    def sft_pipeline(
        model: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
        dataset: str = "yahma/alpaca-cleaned",
        method: str = "lora",
        accelerator: str = "cpu",
        learning_rate: float = 2e-4,
        max_steps: int = 300,
        epochs: float = 1.0,
        lora_r: int = 16,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.05,
        max_length: int = 1024,
        eval_size: float = 200.0,
        min_improvement: float = 0.0,
        experiment: str = "kubetune",
        registered_model: str = "",
        mlflow_tracking_uri: str = "",
        checkpoint_root: str = checkpoint_default,
        force: bool = False,
        refresh_data: bool = False,
        config_yaml: str = "",
        overrides: list = [],  # noqa: B006 - read by the KFP compiler as the parameter's default, never mutated
    ):
        base = {"config_yaml": config_yaml, "overrides": overrides}
        config = {
            **base,
            "model": model,
            "dataset": dataset,
            "method": method,
            "learning_rate": learning_rate,
            "max_steps": max_steps,
            "epochs": epochs,
            "lora_r": lora_r,
            "lora_alpha": lora_alpha,
            "lora_dropout": lora_dropout,
            "max_length": max_length,
            "eval_size": eval_size,
            "min_improvement": min_improvement,
            "experiment": experiment,
            "registered_model": registered_model,
            "mlflow_tracking_uri": mlflow_tracking_uri,
        }

        with dsl.If(refresh_data == True, name="refresh-data"):  # noqa: E712 - builds a KFP condition
            fresh = _task(
                c.prepare_fresh(dataset=dataset, eval_size=eval_size, **base),
                stage="prepare",
                display="Prepare data (fresh read)",
                cache=False,
            )
        with dsl.Else(name="reuse-cached-data"):
            cached = _task(
                c.prepare(dataset=dataset, eval_size=eval_size, **base),
                stage="prepare",
                display="Prepare data",
                cache=True,
            )
        prepared = dsl.OneOf(fresh.outputs["prepared_dataset"], cached.outputs["prepared_dataset"])

        check = _task(
            c.check_unchanged(prepared_dataset=prepared, accelerator=accelerator, force=force, **config),
            stage="check-unchanged",
            display="Check for new data",
            cache=False,
        )

        with dsl.If(check.outputs["Output"] != UNCHANGED, name="data-changed"):
            pack = _task(
                c.pack(prepared_dataset=prepared, model=model, max_length=max_length, **base),
                stage="pack",
                display="Pack",
                cache=True,
            )
            packed = pack.outputs["packed_dataset"]
            train_args = {
                "packed_dataset": packed,
                "checkpoint_root": checkpoint_root,
                "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                **config,
            }
            with dsl.If(accelerator == "gpu", name="train-on-gpu"):
                on_gpu = _task(
                    c.train_gpu(**train_args),
                    stage="train-gpu",
                    display="Train on GPU",
                    cache=False,
                    gpu=True,
                )
            with dsl.Else(name="train-on-cpu"):
                on_cpu = _task(c.train_cpu(**train_args), stage="train-cpu", display="Train on CPU (C3)", cache=False)
            for train in (on_gpu, on_cpu):
                train.set_retry(**TRAIN_RETRY)
                if checkpoint_pvc:
                    kubernetes.mount_pvc(train, pvc_name=checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
                if checkpoint_gcsfuse:
                    kubernetes.add_pod_annotation(train, *GCSFUSE_ANNOTATION)
            adapter = dsl.OneOf(on_gpu.outputs["adapter"], on_cpu.outputs["adapter"])

            evaluate = _task(
                c.evaluate(adapter=adapter, packed_dataset=packed, prepared_dataset=prepared, **config),
                stage="evaluate",
                display="Evaluate",
                cache=False,
            )
            _task(
                c.register(
                    adapter=adapter,
                    eval_report=evaluate.outputs["eval_report"],
                    prepared_dataset=prepared,
                    packed_dataset=packed,
                    **config,
                ),
                stage="register",
                display="Register",
                cache=False,
            )

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
