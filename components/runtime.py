"""What the KFP components call at run time, inside their container (or kfp.local's subprocess).

The component bodies stay a few lines (imports, then one call into the kubetune library); the glue they share
lives
here: building the Config from the pipeline parameters, copying a stage's report into a Markdown artifact,
logging scalars into a Metrics artifact, and rendering the data check and the registration (both decided and
built by ``kubetune.register``). Nothing here imports
kfp: artifacts are used through their ``.path`` / ``.metadata`` / ``.log_metric`` attributes, so every
function is unit-tested in-process.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from components.params import ACCELERATORS, CONFIG_KEYS

UNCHANGED = "unchanged"  # kubetune.register.UNCHANGED (tested equal): the verdict that skips training


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


@contextmanager
def exit_3_when_preempted() -> Iterator[None]:
    """Inside: ``kubetune.errors.Preempted`` ends the process with exit code 3 (its message on stderr), the
    code that means "preempted, a checkpoint is on disk, run again to resume" (KFP's executor would turn the
    exception into exit 1)."""
    import sys

    from kubetune.errors import Preempted

    try:
        yield
    except Preempted as err:
        print(f"kubetune: {err}", file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None


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

    The decision is :func:`kubetune.register.check_data` (the prepared data's fingerprint against the one
    recorded on the registered model's current ``champion``); the markdown is its
    :func:`kubetune.register.data_check_report`.
    """
    from kubetune import register
    from kubetune.report import to_markdown

    if accelerator not in ACCELERATORS:
        raise _user_error(f"pipeline parameter `accelerator`: {accelerator!r} is not one of {', '.join(ACCELERATORS)}")
    check = register.check_data(cfg, prepared_dir, force=force)
    return check.verdict, to_markdown(register.data_check_report(check, accelerator=accelerator))


def registration_markdown(registration: Mapping[str, Any]) -> str:
    """A short summary of ``registration.json`` for the run page (:func:`kubetune.register.registration_report`)."""
    from kubetune.register import registration_report
    from kubetune.report import to_markdown

    return to_markdown(registration_report(registration))
