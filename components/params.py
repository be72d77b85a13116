"""The pipeline parameters a person sets in the Kubeflow UI's run form, the config keys behind them, and their
defaults.

One table, used everywhere the parameters appear: the pipeline's signature takes its types and defaults from it
(:func:`defaults`), the components build a ``kubetune.config.Config`` from them
(:func:`components.runtime.build_config`, which calls :func:`kubetune.config.layer`), the CLI derives them from a
config file (:func:`pipelines.arguments.pipeline_arguments`), and their descriptions go into the compiled pipeline
spec, which the KFP UI shows next to each field.

A parameter that sets a config key takes its default from ``kubetune.config.Config`` (so ``learning_rate``'s
default is ``train.learning_rate``'s, and nowhere else), except the few ``form`` presets below: the library has no
default model or dataset, and a form submitted unchanged must fine-tune something in a bounded time.

Precedence inside a component: ``config_yaml`` (a whole config as YAML text) < the named parameters <
``overrides`` (``["lora.r=8", ...]``). A named string parameter left empty (``""``) keeps the value from
``config_yaml`` (or the library default), so the UI can hand a key back to ``config_yaml``.

This module imports neither kfp nor (until :func:`defaults` is called) kubetune: it is read at compile time and
inside the component containers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LIBRARY = object()  # Param.form: the run form's default is the library's (``Config``'s) value of the key


@dataclass(frozen=True)
class Param:
    """A pipeline parameter: its UI name, the config key it sets (None: pipeline-only), what it does, its type in
    the pipeline's signature and the run form's default (:data:`LIBRARY`: the config key's default)."""

    name: str
    key: str | None
    doc: str
    type: type = str
    form: Any = LIBRARY


PARAMS: tuple[Param, ...] = (
    Param(
        "model",
        "model.name_or_path",
        "Base model: a Hugging Face hub id, a folder the pods can read, or a "
        ".gguf file. Empty: the model in config_yaml.",
        form="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    Param(
        "dataset",
        "data.path",
        "Training data: a hub dataset id, a gs:// or local path the pods can read "
        "(.jsonl/.json/.parquet/.csv or a folder of them). Empty: config_yaml's.",
        form="yahma/alpaca-cleaned",
    ),
    Param("method", "method", "`lora` (full-precision base) or `qlora` (4-bit base through bitsandbytes)."),
    Param(
        "accelerator",
        None,
        "Where training runs: `cpu` (the C3 pool, bf16 on AMX) or `gpu` (the GPU pool, "
        "one GPU, an L4 by default). Every other stage runs on the CPU pool.",
        form="cpu",
    ),
    Param("learning_rate", "train.learning_rate", "Peak learning rate.", type=float),
    Param("max_steps", "train.max_steps", "Optimizer steps; -1 trains for `epochs` instead.", type=int, form=300),
    Param("epochs", "train.epochs", "Epochs over the packed rows when max_steps is -1.", type=float),
    Param("lora_r", "lora.r", "LoRA rank.", type=int),
    Param("lora_alpha", "lora.alpha", "LoRA alpha (scaling = alpha / r).", type=float),
    Param("lora_dropout", "lora.dropout", "Dropout on the LoRA input (0 takes PEFT's faster path).", type=float),
    Param("max_length", "pack.max_length", "Tokens per packed row, and the longest example kept.", type=int),
    Param(
        "eval_size",
        "data.eval_size",
        "Held-out rows: a fraction in (0, 1) or a row count >= 1.",
        type=float,
        form=200.0,
    ),
    Param(
        "min_improvement",
        "tracking.min_improvement",
        "Promotion gate: the adapter becomes `champion` only if "
        "its eval loss beats the champion's (or the base model's) "
        "by at least this much.",
        type=float,
    ),
    Param("experiment", "tracking.experiment", "MLflow experiment that receives the run."),
    Param(
        "registered_model",
        "tracking.registered_model",
        "MLflow registered model name. Empty: `kubetune-<model basename>` (or config_yaml's).",
    ),
    Param(
        "mlflow_tracking_uri",
        "tracking.uri",
        "MLflow tracking URI. Empty: MLFLOW_TRACKING_URI from the ConfigMap `kubetune-settings` (or config_yaml's).",
    ),
    Param(
        "train_nodes",
        None,
        "Nodes that train together (torch.distributed, one rank per node, on the pool `accelerator` "
        "picks): 1 trains in the train task's pod; more run a Kubeflow Trainer TrainJob over that many "
        "nodes, which needs the shared checkpoint volume (compiled with --checkpoint-pvc).",
        type=int,
        form=1,
    ),
    Param(
        "checkpoint_root",
        None,
        "A path in the train pod that outlives it (the checkpoint PVC mount, or a GCS "
        "FUSE mount). Checkpoints go to <checkpoint_root>/<run id>, so a retried train "
        "task resumes. Empty: inside the pod (a retry starts over).",
        form="",
    ),
    Param(
        "force",
        None,
        "Train even when the prepared data is identical to the data behind the current champion.",
        type=bool,
        form=False,
    ),
    Param(
        "refresh_data",
        None,
        "Re-read the dataset even when an identical earlier run's prepare output is cached "
        "(recurring schedules set it, so they see new data behind an unchanged path).",
        type=bool,
        form=False,
    ),
    Param(
        "config_yaml",
        None,
        "A whole kubetune config as YAML text (see `kubetune config --explain`); the named "
        "parameters and overrides are applied on top of it.",
        form="",
    ),
    Param(
        "overrides",
        None,
        'Extra config overrides applied last, e.g. ["lora.target_modules=[q_proj,v_proj]", "train.batch_size=8"].',
        type=list,
        form=(),
    ),
)

BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}

# Named parameter -> dotted config key, for the parameters that set a config key.
CONFIG_KEYS: dict[str, str] = {p.name: p.key for p in PARAMS if p.key is not None}

ACCELERATORS = ("cpu", "gpu")


def defaults() -> dict[str, Any]:
    """Every parameter's run-form default, by name, as the parameter's type: the form preset, else the config
    key's default in ``kubetune.config.Config`` (a key whose default is None: ``""``, which keeps it)."""
    from kubetune.config import Config

    library = Config().flat()
    out: dict[str, Any] = {}
    for p in PARAMS:
        value = library[p.key] if p.form is LIBRARY else p.form
        out[p.name] = "" if value is None else p.type(value)
    return out
