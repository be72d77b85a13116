"""The pipeline's steps as plain Python functions; :mod:`components.factory` turns them into KFP components.

Each is a KFP v2 lightweight component body: KFP ships only the function's source to the container, so every
import sits inside the body, and the body is a call into the kubetune library (the glue shared by all steps
lives in :mod:`components.runtime`). Stage outputs are written into the output artifact's ``.path`` folder
exactly as the library writes them locally (see docs/architecture.md); the stage's Markdown report is copied
into a ``Markdown`` artifact and its scalars into a ``Metrics`` artifact, which the KFP run page shows.

The config parameters (model, dataset, method, learning_rate, ... , config_yaml, overrides) are the pipeline
parameters of the same name, documented once in :mod:`components.params`; the factory copies those
descriptions into each component's spec. A step receives only the parameters it reads where KFP caching
matters (prepare, pack), so changing, say, the learning rate still reuses their cached outputs.
"""

from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def prepare(
    dataset: str,
    eval_size: float,
    config_yaml: str,
    overrides: list,
    prepared_dataset: Output[Dataset],
    data_report: Output[Markdown],
):
    """Read the raw dataset, normalise rows to chat messages, validate, dedupe and split train/eval.

    Args:
        prepared_dataset: Folder with train.jsonl, eval.jsonl, data_report.json/.md and manifest.json; its
            metadata carries the data fingerprint and row counts.
        data_report: The data report (formats found, rows kept, dropped and why, split sizes).
    """
    from components import runtime
    from kubetune.prepare import prepare as run_prepare

    cfg = runtime.config_from(config_yaml, overrides, dataset=dataset, eval_size=eval_size)
    out = run_prepare(cfg, prepared_dataset.path)
    runtime.annotate(prepared_dataset, out)
    runtime.publish_markdown(out, "data_report.md", data_report)


def check_unchanged(
    prepared_dataset: Input[Dataset],
    accelerator: str,
    force: bool,
    model: str,
    dataset: str,
    method: str,
    learning_rate: float,
    max_steps: int,
    epochs: float,
    lora_r: int,
    lora_alpha: float,
    lora_dropout: float,
    max_length: int,
    eval_size: float,
    min_improvement: float,
    experiment: str,
    registered_model: str,
    mlflow_tracking_uri: str,
    config_yaml: str,
    overrides: list,
    decision: Output[Markdown],
) -> str:
    """Decide whether this run trains: compare the prepared data with the data behind the current champion.

    Args:
        prepared_dataset: The prepare step's output; its manifest fingerprint identifies the data.
        decision: What was compared and the verdict.

    Returns:
        Output: `unchanged` (identical data, no force: the run stops here) or why it trains: `new-data`,
            `no-champion` or `forced`.
    """
    from components import runtime

    cfg = runtime.config_from(
        config_yaml,
        overrides,
        model=model,
        dataset=dataset,
        method=method,
        learning_rate=learning_rate,
        max_steps=max_steps,
        epochs=epochs,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        max_length=max_length,
        eval_size=eval_size,
        min_improvement=min_improvement,
        experiment=experiment,
        registered_model=registered_model,
        mlflow_tracking_uri=mlflow_tracking_uri,
    )
    verdict, report = runtime.decide(cfg, prepared_dataset.path, force=force, accelerator=accelerator)
    runtime.write_markdown(decision, report)
    return verdict


def pack(
    prepared_dataset: Input[Dataset],
    model: str,
    max_length: int,
    config_yaml: str,
    overrides: list,
    packed_dataset: Output[Dataset],
    pack_report: Output[Markdown],
):
    """Apply the chat template, mask the loss to assistant tokens and pack examples into fixed-length rows.

    Args:
        prepared_dataset: The prepare step's output.
        packed_dataset: Folder with train/ and eval/ (datasets save_to_disk), tokenizer/, pack_report.json/.md
            and manifest.json.
        pack_report: Lengths, truncation and packing efficiency.
    """
    from components import runtime
    from kubetune.pack import pack as run_pack

    cfg = runtime.config_from(config_yaml, overrides, model=model, max_length=max_length)
    out = run_pack(cfg, prepared_dataset.path, packed_dataset.path)
    runtime.annotate(packed_dataset, out)
    runtime.publish_markdown(out, "pack_report.md", pack_report)


def train(
    packed_dataset: Input[Dataset],
    checkpoint_root: str,
    run_id: str,
    train_nodes: int,
    train_pool: str,
    train_image: str,
    checkpoint_pvc: str,
    checkpoint_gcsfuse: bool,
    model: str,
    dataset: str,
    method: str,
    learning_rate: float,
    max_steps: int,
    epochs: float,
    lora_r: int,
    lora_alpha: float,
    lora_dropout: float,
    max_length: int,
    eval_size: float,
    min_improvement: float,
    experiment: str,
    registered_model: str,
    mlflow_tracking_uri: str,
    config_yaml: str,
    overrides: list,
    adapter: Output[Model],
    train_metrics: Output[Metrics],
):
    """Fine-tune a LoRA / QLoRA adapter on the packed rows (TRL SFTTrainer), resuming from a checkpoint; on more
    than one node through a Kubeflow Trainer TrainJob that this task submits, follows and deletes
    (pipelines/trainjob.py).

    Args:
        packed_dataset: The pack step's output.
        run_id: The pipeline run's id: checkpoints go to <checkpoint_root>/<run_id>, the same folder for every
            retry of this task, so a retry after a preemption resumes instead of starting over.
        train_pool: The pool this task and its TrainJob's nodes run on (`cpu` or `gpu`), set at compile time.
        train_image: This task's image, which the TrainJob's nodes run too, set at compile time.
        checkpoint_pvc: The checkpoint claim mounted in this task ('' for none), which the TrainJob's nodes
            mount at the same path, set at compile time.
        checkpoint_gcsfuse: Whether that claim is a GCS FUSE volume (the nodes get GKE's sidecar annotation).
        adapter: Folder with adapter_model.safetensors, adapter_config.json, tokenizer files, base_model.json,
            training_summary.json, config.yaml and manifest.json.
        train_metrics: final_loss, global_step, tokens_seen, train_tokens_per_second, train_seconds, ...
    """
    from components import runtime
    from pipelines import trainjob

    cfg = runtime.config_from(
        config_yaml,
        overrides,
        extra={"train.checkpoint_dir": runtime.checkpoint_dir(checkpoint_root, run_id)},
        model=model,
        dataset=dataset,
        method=method,
        learning_rate=learning_rate,
        max_steps=max_steps,
        epochs=epochs,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        max_length=max_length,
        eval_size=eval_size,
        min_improvement=min_improvement,
        experiment=experiment,
        registered_model=registered_model,
        mlflow_tracking_uri=mlflow_tracking_uri,
    )
    with runtime.exit_3_when_preempted():
        out = trainjob.train(
            cfg,
            packed_dataset.path,
            adapter.path,
            nodes=train_nodes,
            pool=train_pool,
            image=train_image,
            checkpoint_pvc=checkpoint_pvc,
            checkpoint_gcsfuse=checkpoint_gcsfuse,
            run_id=run_id,
        )
    runtime.annotate(adapter, out, base_model=cfg.model.name_or_path, method=cfg.method)
    runtime.log_metrics(train_metrics, runtime.read_json(out, "training_summary.json"))


def evaluate(
    adapter: Input[Model],
    packed_dataset: Input[Dataset],
    prepared_dataset: Input[Dataset],
    model: str,
    dataset: str,
    method: str,
    learning_rate: float,
    max_steps: int,
    epochs: float,
    lora_r: int,
    lora_alpha: float,
    lora_dropout: float,
    max_length: int,
    eval_size: float,
    min_improvement: float,
    experiment: str,
    registered_model: str,
    mlflow_tracking_uri: str,
    config_yaml: str,
    overrides: list,
    eval_report: Output[Artifact],
    eval_summary: Output[Markdown],
    eval_metrics: Output[Metrics],
):
    """Score the base model and the adapter on the same held-out rows and generate samples side by side.

    Args:
        adapter: The train step's output (from whichever branch ran).
        packed_dataset: The pack step's output (held-out rows, tokenizer and chat template).
        prepared_dataset: The prepare step's output (held-out conversations for generation).
        eval_report: Folder with metrics.json, samples.jsonl, eval_report.md and manifest.json.
        eval_summary: The evaluation report: losses, perplexities, task metrics, samples.
        eval_metrics: eval_loss, base_eval_loss, eval_loss_delta, perplexities, exact_match, rouge_l, ...
    """
    from components import runtime
    from kubetune.evaluation import evaluate as run_evaluate

    cfg = runtime.config_from(
        config_yaml,
        overrides,
        model=model,
        dataset=dataset,
        method=method,
        learning_rate=learning_rate,
        max_steps=max_steps,
        epochs=epochs,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        max_length=max_length,
        eval_size=eval_size,
        min_improvement=min_improvement,
        experiment=experiment,
        registered_model=registered_model,
        mlflow_tracking_uri=mlflow_tracking_uri,
    )
    out = run_evaluate(cfg, adapter.path, packed_dataset.path, prepared_dataset.path, eval_report.path)
    runtime.annotate(eval_report, out)
    runtime.publish_markdown(out, "eval_report.md", eval_summary)
    runtime.log_metrics(eval_metrics, runtime.read_json(out, "metrics.json"))


def register(
    adapter: Input[Model],
    eval_report: Input[Artifact],
    prepared_dataset: Input[Dataset],
    packed_dataset: Input[Dataset],
    model: str,
    dataset: str,
    method: str,
    learning_rate: float,
    max_steps: int,
    epochs: float,
    lora_r: int,
    lora_alpha: float,
    lora_dropout: float,
    max_length: int,
    eval_size: float,
    min_improvement: float,
    experiment: str,
    registered_model: str,
    mlflow_tracking_uri: str,
    config_yaml: str,
    overrides: list,
    registration: Output[Artifact],
    registration_summary: Output[Markdown],
) -> str:
    """Log the run to MLflow, register a model version and apply the promotion gate on the `champion` alias.

    Args:
        adapter: The train step's output.
        eval_report: The evaluate step's output (metrics for the gate).
        prepared_dataset: The prepare step's output (its fingerprint is recorded on the model version).
        packed_dataset: The pack step's output.
        registration: Folder with registration.json (status, tracking_uri, experiment, run_id, model_name,
            version, promotion, promotion_reason, champion_version) and manifest.json; while MLflow cannot be
            reached, also the outbox that a later `kubetune register` sends.
        registration_summary: The registration as a table.

    Returns:
        Output: `promoted` or `rejected`; `pending` when MLflow could not be reached (the registration
            waits in the output's outbox), `disabled` when tracking is off.
    """
    from components import runtime
    from kubetune.register import register as run_register

    cfg = runtime.config_from(
        config_yaml,
        overrides,
        model=model,
        dataset=dataset,
        method=method,
        learning_rate=learning_rate,
        max_steps=max_steps,
        epochs=epochs,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        max_length=max_length,
        eval_size=eval_size,
        min_improvement=min_improvement,
        experiment=experiment,
        registered_model=registered_model,
        mlflow_tracking_uri=mlflow_tracking_uri,
    )
    out = run_register(
        cfg,
        adapter.path,
        eval_report.path,
        registration.path,
        prepared=prepared_dataset.path,
        packed=packed_dataset.path,
    )
    info = runtime.read_json(out, "registration.json")
    runtime.annotate(registration, out, **{k: str(info.get(k, "")) for k in ("model_name", "version", "run_id")})
    runtime.write_markdown(registration_summary, runtime.registration_markdown(info))
    return str(info.get("promotion") or info.get("status") or "")
