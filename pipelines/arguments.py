"""Pipeline arguments from a kubetune config file: what `run --local`, `submit` and `schedule` send.

The keys that have a named pipeline parameter (model, dataset, lora_r, ...) travel as those parameters, with
the values the config resolves to; every other key the file sets travels in ``config_yaml``, with the named
keys taken out. The two never disagree, the run form in the KFP UI shows the main knobs, and changing one that
prepare and pack do not read (say the learning rate) keeps their cached outputs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from components.params import ACCELERATORS, CONFIG_KEYS
from kubetune.config import Config, ConfigError, load, merge, parse_overrides
from kubetune.errors import UserError


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[dict[str, Any], Config]:
    """``(raw mapping as written + --set, validated Config)``; bad files and keys raise UserError."""
    cfg = load(path, overrides)  # validates, naming the file and key
    raw: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return merge(raw, parse_overrides(overrides)), cfg


def _get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    chain = []
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            return
        chain.append((node, part))
        node = child
    node.pop(leaf, None)
    for parent, part in reversed(chain):  # remove sections left empty
        if parent[part] == {}:
            del parent[part]


def pipeline_arguments(
    raw: dict[str, Any],
    cfg: Config,
    *,
    accelerator: str = "cpu",
    checkpoint_root: str = "",
    force: bool = False,
    refresh_data: bool = False,
    train_nodes: int = 1,
) -> dict[str, Any]:
    """The pipeline's arguments for a config (see the module docstring)."""
    if accelerator not in ACCELERATORS:
        raise UserError(f"--accelerator {accelerator!r}: expected one of {', '.join(ACCELERATORS)}")
    check_train_nodes(train_nodes)
    for key, what in (("model.name_or_path", "the base model"), ("data.path", "the dataset")):
        if not _get(cfg, key):
            raise ConfigError(f"config key `{key}`: empty; set {what} in the config file or with --set {key}=...")
    arguments: dict[str, Any] = {}
    rest = copy.deepcopy(raw)
    for name, key in CONFIG_KEYS.items():
        value = _get(cfg, key)
        arguments[name] = "" if value is None else value
        _drop(rest, key)
    arguments.update(
        config_yaml=yaml.safe_dump(rest, sort_keys=False) if rest else "",
        overrides=[],
        accelerator=accelerator,
        checkpoint_root=checkpoint_root,
        force=force,
        refresh_data=refresh_data,
        train_nodes=train_nodes,
    )
    return arguments


def check_train_nodes(train_nodes: Any) -> int:
    """``--train-nodes`` as a node count >= 1, else a UserError (the train task checks it again)."""
    if isinstance(train_nodes, bool) or not isinstance(train_nodes, int) or train_nodes < 1:
        raise UserError(
            f"--train-nodes {train_nodes!r}: expected a node count of 1 or more (1 trains in the train task's pod)"
        )
    return train_nodes


def check_for_cluster(cfg: Config) -> list[str]:
    """Refuse settings that cannot work in the cluster's pods; return warnings for doubtful ones."""
    uri = cfg.tracking.uri or ""
    if uri and (uri.startswith(("sqlite:", "file:")) or "://" not in uri):
        raise ConfigError(
            f"config key `tracking.uri`: {uri!r} is a file on this machine, and a pod's files are "
            "gone when it ends; drop the key (the pods read MLFLOW_TRACKING_URI from the ConfigMap "
            "kubetune-settings) or point it at the MLflow server, e.g. --set "
            "tracking.uri=http://mlflow.kubetune.svc:5000"
        )
    warnings = []
    for key in ("model.name_or_path", "data.path"):
        value = str(_get(cfg, key))
        if Path(value).expanduser().exists():
            warnings.append(
                f"config key `{key}`: {value} is a path on this machine; the pods must see it at the "
                "same path (a hub id or a gs:// path travels better)"
            )
    return warnings
