"""What the KFP components call at run time, inside their container (or kfp.local's subprocess).

The component bodies stay a few lines (imports, then one call into the kubetune library); the glue they share
lives
here: building the Config from the pipeline parameters, copying a stage's report into a Markdown artifact,
logging scalars into a Metrics artifact, and the "has the data changed since the champion?" decision. Nothing
here imports
kfp: artifacts are used through their ``.path`` / ``.metadata`` / ``.log_metric`` attributes, so every
function is unit-tested in-process.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components.params import ACCELERATORS, CONFIG_KEYS

UNCHANGED = "unchanged"  # check_unchanged's verdict that skips training; every other verdict trains


def _user_error(message: str) -> Exception:
    from kubetune.errors import UserError

    return UserError(message)


_KEY_IN_MESSAGE = re.compile(r"config key `([^`]+)`")
_PARAM_OF_KEY = {key: name for name, key in CONFIG_KEYS.items()}


def build_config(config_yaml: str, overrides: list[str] | None, **params: Any):
    """The stage's ``kubetune.config.Config``: ``config_yaml`` < named ``params`` < ``overrides``, layered by
    :func:`kubetune.config.layer` (the same layering ``kubetune --config FILE --set ...`` uses).

    ``params`` are pipeline parameters named as in :mod:`components.params` (a string left ``""`` keeps the
    value from ``config_yaml``). Bad values raise ``UserError`` naming the pipeline parameter and the config
    key.
    """
    import yaml

    from kubetune.config import ConfigError, from_dict, layer

    try:
        data = yaml.safe_load(config_yaml) if config_yaml and config_yaml.strip() else {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise _user_error(
            f"pipeline parameter `config_yaml`{where}: not valid YAML ({getattr(err, 'problem', err)})"
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _user_error(
            f"pipeline parameter `config_yaml`: expected a mapping of config sections, got "
            f"{type(data).__name__}; see `kubetune config --explain`"
        )
    for name in params:
        if name not in CONFIG_KEYS:
            raise TypeError(f"{name!r} is not a pipeline parameter that sets a config key")  # programming error
    named = {CONFIG_KEYS[name]: value for name, value in params.items() if not (isinstance(value, str) and value == "")}
    if overrides and (not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides)):
        raise _user_error(
            f"pipeline parameter `overrides`: expected a list of KEY=VALUE strings such as "
            f'["lora.r=8"], got {overrides!r}'
        )
    try:
        data = layer(data, named, overrides)  # the named keys are fixed and well-formed: errors are the overrides'
    except ConfigError as err:
        raise _user_error(f"pipeline parameter `overrides`: {err}") from None
    try:
        return from_dict(data)
    except ConfigError as err:
        message = str(err)
        match = _KEY_IN_MESSAGE.search(message)
        param = _PARAM_OF_KEY.get(match.group(1)) if match else None
        if param is not None and param in params:
            raise _user_error(f"pipeline parameter `{param}`: {message}") from None
        raise _user_error(f"pipeline parameters: {message}") from None


def config_from(
    config_yaml: str, overrides: list[str] | None, *, extra: Mapping[str, Any] | None = None, **params: Any
):
    """The Config for a component body: :func:`build_config` of its config parameters, then ``extra`` dotted
    keys whose value is not None (e.g. the train task's checkpoint folder); also turns on INFO logging to stderr so
    the stage's progress shows in the task's log."""
    _setup_logging()
    cfg = build_config(config_yaml, overrides, **params)
    extra = {key: value for key, value in (extra or {}).items() if value is not None}
    return cfg.replace(**extra) if extra else cfg


def _setup_logging() -> None:
    import logging
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
    for noisy in ("httpx", "urllib3", "alembic", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def checkpoint_dir(checkpoint_root: str, run_id: str) -> str | None:
    """``<checkpoint_root>/<run id>``: one folder for all retries of a run's train task (None: in the pod)."""
    root = checkpoint_root.strip()
    if not root:
        return None
    if "://" in root:
        raise _user_error(
            f"pipeline parameter `checkpoint_root`: {root!r} is a URL, but checkpoints are written "
            "through the file system; mount the storage in the train pod (a PVC, or a GCS FUSE "
            "volume) and pass the mount path, e.g. /mnt/checkpoints"
        )
    if not run_id or "{{" in run_id:
        raise _user_error("pipeline run id is missing; the train task needs it to keep checkpoints per run")
    return f"{root.rstrip('/')}/{run_id}"


def publish_markdown(stage_dir: str | Path, filename: str, artifact: Any) -> None:
    """Copy the stage's Markdown report ``stage_dir/filename`` into a KFP ``Markdown`` artifact."""
    src = Path(stage_dir) / filename
    if not src.is_file():
        raise FileNotFoundError(f"{src}: the stage wrote no {filename}; its output folder is incomplete")
    write_markdown(artifact, src.read_text(encoding="utf-8"))


def write_markdown(artifact: Any, text: str) -> None:
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = value
    return out


def log_metrics(artifact: Any, values: Mapping[str, Any]) -> dict[str, float]:
    """Log every finite scalar of ``values`` into a KFP ``Metrics`` artifact (the run page lists them)."""
    scalars = _numbers(values)
    for key, value in scalars.items():
        artifact.log_metric(key, value)
    return scalars


def annotate(artifact: Any, stage_dir: str | Path, **extra: Any) -> dict[str, Any]:
    """Copy the stage manifest's fingerprint and counts (and ``extra``) into the artifact's metadata (UI)."""
    from kubetune.artifacts import read_manifest

    manifest = read_manifest(stage_dir)
    meta = {"fingerprint": manifest.get("fingerprint", ""), "stage": manifest.get("stage", "")}
    meta.update(_numbers(manifest.get("counts") or {}))
    meta.update(extra)
    artifact.metadata.update(meta)
    return meta


def read_json(stage_dir: str | Path, filename: str) -> dict[str, Any]:
    path = Path(stage_dir) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the stage wrote no {filename}; its output folder is incomplete")
    return json.loads(path.read_text(encoding="utf-8"))


def decide(cfg, prepared_dir: str | Path, *, force: bool, accelerator: str) -> tuple[str, str]:
    """Train or not: ``(verdict, markdown)``; the verdict is ``unchanged`` (skip) or why training goes ahead.

    The prepared data's fingerprint (its manifest's ``fingerprint``) is compared with the one recorded on the
    registered model's current ``champion``: identical data and no ``force`` means a recurring run has nothing
    new to learn from, so the run records "unchanged" and stops before packing and training.
    """
    from kubetune.artifacts import read_manifest
    from kubetune.register import champion_data_fingerprint
    from kubetune.tracking import registered_model_name, resolve_uri

    if accelerator not in ACCELERATORS:
        raise _user_error(f"pipeline parameter `accelerator`: {accelerator!r} is not one of {', '.join(ACCELERATORS)}")
    current = read_manifest(prepared_dir, "prepare")["fingerprint"]
    champion = champion_data_fingerprint(cfg)
    if force:
        verdict, why = "forced", "`force` is set: training regardless of the data"
    elif champion is None:
        verdict, why = "no-champion", "no champion model version records its data yet: training"
    elif champion != current:
        verdict, why = "new-data", "the prepared data differs from the champion's: training"
    else:
        verdict, why = UNCHANGED, "the prepared data is identical to the champion's: training skipped"
    lines = [
        "# Data check",
        "",
        f"**{verdict}**: {why}.",
        "",
        "| | data fingerprint |",
        "| --- | --- |",
        f"| this run | `{current}` |",
        f"| champion | `{champion or '-'}` |",
        "",
        f"Registered model `{registered_model_name(cfg)}` at `{resolve_uri(cfg)}`; training runs on `{accelerator}`.",
    ]
    return verdict, "\n".join(lines) + "\n"


def registration_markdown(registration: Mapping[str, Any]) -> str:
    """A short summary of ``registration.json`` for the run page."""
    keys = (
        "status",
        "model_name",
        "version",
        "promotion",
        "promotion_reason",
        "champion_version",
        "experiment",
        "run_id",
        "tracking_uri",
        "error",
    )
    rows = [(key, registration[key]) for key in keys if registration.get(key) is not None]
    lines = ["# Registration", "", "| | |", "| --- | --- |"]
    lines += [f"| {key} | {str(value).replace('|', '/')} |" for key, value in rows]
    return "\n".join(lines) + "\n"
