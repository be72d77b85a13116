"""The MLflow transport (the only module that imports mlflow): where the store is, retries, sending a
registration idempotently, outbox files, and :class:`MlflowRegistry`, the MLflow implementation of
:class:`kubetune.promotion.Registry`. The promotion protocol itself (decide, promote, converge) is
:mod:`kubetune.promotion`; :func:`promote` and :func:`converge` here run it on MLflow versions.

Where: ``tracking.uri`` in the config, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<output_dir>/mlflow.db``
(a local store with a model registry; its artifacts go to ``<output_dir>/mlartifacts/``). ``kubetune ui`` opens it
with ``mlflow ui --backend-store-uri <uri>`` (:func:`ui_command`).

Sending: :func:`send` takes a *payload*, a plain JSON-serialisable dict built by ``kubetune.register`` (so that it
can be kept in an outbox file and sent later), and makes the MLflow state match it, idempotently:

- one run per kubetune run, found by its tag ``kubetune.run_id`` before one is created; params, metrics, the
  training curve and dataset inputs that are already there are not logged twice; artifacts are re-uploaded;
- one model version per run (found by run id) whose source is the run's ``<artifact_uri>/<artifact_path>``;
- the promotion gate (:func:`promote`, i.e. :func:`kubetune.promotion.promote`) on alias ``champion``.

The whole send is retried with exponential backoff on failure (:class:`Retry`: a few attempts, bounded total time;
MLflow's own HTTP retries are switched off meanwhile so the bound holds). When it still fails,
:class:`TrackingUnavailable` says why; the caller keeps the payload. Sending again later picks up where it stopped.

Payload::

    {"tracking_uri": str, "experiment": str,
     "run": {"key": <kubetune run id>, "name": str|null, "tags": {str: str}, "params": {str: str},
             "metrics": {str: float}, "history": {"train_loss": [[step, value], ...]},
             "artifacts": [{"path": <file or folder; relative paths are under base_dir>, "artifact_path": str}],
             "datasets": [<dataset_record(...)>], "note": <Markdown shown as the run's description>},
     "model": {"name": str, "artifact_path": "adapter", "tags": {str: str}, "description": str},
     "gate": {"eval_loss": float, "base_eval_loss": float, "min_improvement": float}}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubetune import promotion
from kubetune.errors import UserError
from kubetune.promotion import (  # the protocol's names, used by register and the tests through this module too
    ALIAS,
    PROMOTED,  # noqa: F401
    RACE_WINDOW_S,
    REJECTED,  # noqa: F401
    TAG_BASELINE,  # noqa: F401
    TAG_EVAL_LOSS,  # noqa: F401
    TAG_PROMOTION,  # noqa: F401
    TAG_REASON,  # noqa: F401
    decide,
)

log = logging.getLogger(__name__)

TAG_RUN_KEY = "kubetune.run_id"
TAG_DATA_FINGERPRINT = "kubetune.data_fingerprint"
TAG_BASE_EVAL_LOSS = "kubetune.base_eval_loss"
TAG_BASE_MODEL = "kubetune.base_model"
MAX_PARAM_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_LENGTH = 8000
MAX_KEY_LENGTH = 250
_BATCH = 100

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------------------
# Where the store is


def default_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).expanduser().resolve() / 'mlflow.db'}"


def resolve_uri(cfg) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the local sqlite store under ``output_dir``."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(cfg.output_dir)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute or relative to the working directory), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :]).expanduser().resolve()


def ui_command(cfg, port: int = 5000, host: str = "127.0.0.1") -> list[str]:
    """The ``mlflow ui`` command line that opens this config's store (the ``mlflow`` beside this Python first)."""
    exe = Path(sys.executable).with_name("mlflow")
    return [
        str(exe) if exe.exists() else "mlflow",
        "ui",
        "--backend-store-uri",
        resolve_uri(cfg),
        "--host",
        host,
        "--port",
        str(port),
    ]


def registered_model_name(cfg, base_name: str | None = None) -> str:
    """``tracking.registered_model``, else ``kubetune-<basename of the model>`` with unsafe characters replaced."""
    if cfg.tracking.registered_model:
        return cfg.tracking.registered_model
    source = (cfg.model.name_or_path or base_name or "model").strip().rstrip("/")
    stem = re.sub(r"\.gguf$", "", source.rsplit("/", 1)[-1], flags=re.IGNORECASE)
    return "kubetune-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model")


# --------------------------------------------------------------------------------------------------------------
# Retries


@dataclass(frozen=True)
class Retry:
    """Bounded exponential backoff around a whole (idempotent) send.

    No attempt starts once ``deadline_s`` would be passed. With the defaults a server that refuses connections is
    given up on after 4 attempts and 1 + 2 + 4 s of waiting (about 7 s); one that does not answer at all costs
    ``request_timeout_s`` per attempt, so 2 attempts and about 31 s. Each request waits at most
    ``request_timeout_s`` for the server's answer (MLflow's own default is 120 s, with 7 retries of its own)."""

    attempts: int = 4
    base_delay_s: float = 1.0
    max_delay_s: float = 8.0
    deadline_s: float = 30.0
    request_timeout_s: int = 15


class TrackingUnavailable(Exception):
    """MLflow could not be reached or refused the data after the retries; ``progress`` has what got through."""

    def __init__(self, uri: str, cause: BaseException, attempts: int, progress: dict[str, Any] | None = None):
        self.uri, self.cause, self.attempts, self.progress = uri, cause, attempts, progress or {}
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
        super().__init__(
            f"MLflow at {uri} unreachable ({attempts} attempt(s); last error {type(cause).__name__}: {first})"
        )


_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "BAD_REQUEST",
    "INVALID_STATE",
    "FEATURE_DISABLED",
    "ENDPOINT_NOT_FOUND",
    "CUSTOMER_UNAUTHORIZED",
}


def _tracking_errors() -> tuple[type[BaseException], ...]:
    """Failures that mean "MLflow is not usable right now", as opposed to bugs."""
    import requests
    from mlflow.exceptions import MlflowException

    errors: list[type[BaseException]] = [MlflowException, requests.RequestException, OSError]
    with contextlib.suppress(ImportError):
        from sqlalchemy.exc import SQLAlchemyError

        errors.append(SQLAlchemyError)
    return tuple(errors)


# Conflicts of concurrent writers that the server reports as bad requests; the retried (idempotent) send passes.
_RACE_MARKERS = (
    "UNIQUE constraint failed",
    "IntegrityError",
    "database is locked",
    "Duplicate entry",
    "duplicate key value",
)


def _is_transient(err: BaseException) -> bool:
    if any(m in str(err) for m in _RACE_MARKERS):
        return True
    return getattr(err, "error_code", None) not in _PERMANENT_CODES


_env_lock = threading.Lock()
_env_users = 0
_env_saved: dict[str, str | None] = {}


@contextlib.contextmanager
def _http_settings(retry: Retry) -> Iterator[None]:
    """Switch MLflow's own HTTP retries off (ours are bounded) and cap each request's wait, for the duration.
    Reference-counted so that concurrent sends in one process (threads) restore the environment once."""
    global _env_users
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(retry.request_timeout_s)}
    with _env_lock:
        if _env_users == 0:
            _env_saved.clear()
            for k, v in wanted.items():
                _env_saved[k] = os.environ.get(k)
                os.environ[k] = v
        _env_users += 1
    try:
        yield
    finally:
        with _env_lock:
            _env_users -= 1
            if _env_users == 0:
                for k, v in _env_saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


def with_retries(
    fn: Callable[[], T],
    retry: Retry,
    uri: str,
    progress: dict[str, Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()`` with bounded exponential backoff; :class:`TrackingUnavailable` when it keeps failing."""
    errors = _tracking_errors()
    started = time.monotonic()
    attempt = 0
    with _http_settings(retry):
        while True:
            attempt += 1
            try:
                return fn()
            except errors as err:
                delay = min(retry.max_delay_s, retry.base_delay_s * 2 ** (attempt - 1))
                out_of_time = time.monotonic() - started + delay > retry.deadline_s
                if attempt >= retry.attempts or out_of_time or not _is_transient(err):
                    raise TrackingUnavailable(uri, err, attempt, progress) from err
                log.info(
                    "MLflow at %s: attempt %d failed (%s); retrying in %.1f s",
                    uri,
                    attempt,
                    (str(err).splitlines() or [type(err).__name__])[0][:200],
                    delay,
                )
                sleep(delay)


# --------------------------------------------------------------------------------------------------------------
# Payload pieces


def params_from_flat(flat: dict[str, Any]) -> dict[str, str]:
    """Config values as MLflow params: strings (lists/dicts as JSON, None as "None"), cut to MLflow's limits."""
    out: dict[str, str] = {}
    for key, value in flat.items():
        text = json.dumps(value) if isinstance(value, list | dict) else str(value)
        if len(text) > MAX_PARAM_LENGTH:
            text = text[: MAX_PARAM_LENGTH - 14] + "...[truncated]"
        out[key[:MAX_KEY_LENGTH]] = text
    return out


def dataset_record(jsonl: str | Path, *, name: str, digest: str, context: str) -> dict[str, Any]:
    """An MLflow dataset input (lineage) for a prepared ``.jsonl`` split, as plain data for the payload.

    Built with ``mlflow.data.from_pandas`` over the rows (id, source, row, format, messages as JSON) with the
    prepared dataset's fingerprint as digest (cut to MLflow's 36 characters); the rows themselves are not sent.
    """
    import mlflow.data
    import pandas as pd

    rows = []
    with open(jsonl, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                r = json.loads(line)
                rows.append(
                    {
                        "id": str(r.get("id")),
                        "source": str(r.get("source")),
                        "row": r.get("row"),
                        "format": str(r.get("format")),
                        "messages": json.dumps(r.get("messages"), ensure_ascii=False),
                    }
                )
    df = pd.DataFrame(rows, columns=["id", "source", "row", "format", "messages"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # source-type ambiguity and integer-column hints: not actionable here
        ds = mlflow.data.from_pandas(df, source=str(Path(jsonl).resolve()), name=name, digest=digest[:36])
        entity = ds._to_mlflow_entity()
    return {
        "name": entity.name,
        "digest": entity.digest,
        "source_type": entity.source_type,
        "source": entity.source,
        "schema": entity.schema,
        "profile": entity.profile,
        "context": context,
    }


# --------------------------------------------------------------------------------------------------------------
# Sending


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(c, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
            log.info("MLflow experiment %r was deleted; restored it", name)
        return exp.experiment_id
    location = None
    db = sqlite_path(uri)
    if db is not None:  # keep a local store's artifacts beside it, not in the working directory's ./mlruns
        location = str(db.parent / "mlartifacts" / re.sub(r"[^A-Za-z0-9._-]+", "-", name))
    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return c.get_experiment_by_name(name).experiment_id  # created meanwhile by a concurrent run


def _find_run(c, experiment_id: str, key: str):
    runs = c.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_RUN_KEY}` = '{key}'",
        max_results=5,
        order_by=["attributes.start_time ASC"],
    )
    return runs[0] if runs else None


def _log_run_data(c, run, spec: dict[str, Any]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    run_id = run.info.run_id
    now = int(time.time() * 1000)
    tags = dict(spec.get("tags") or {})
    if spec.get("note"):
        note = spec["note"]
        if len(note) > MAX_TAG_LENGTH:
            note = note[: MAX_TAG_LENGTH - 80] + "\n\n... (cut; the full report is the artifact eval/eval_report.md)"
        tags["mlflow.note.content"] = note
    have_params = run.data.params
    params = []
    for k, v in (spec.get("params") or {}).items():
        if k not in have_params:
            params.append(Param(k, v))
        elif have_params[k] != v:
            log.warning(
                "MLflow run %s already has param %s=%r; keeping it (params cannot change), new value %r",
                run_id,
                k,
                have_params[k][:80],
                v[:80],
            )
    metrics = [
        Metric(k, float(v), now, 0)
        for k, v in (spec.get("metrics") or {}).items()
        if run.data.metrics.get(k) != float(v)
    ]
    for key, points in (spec.get("history") or {}).items():
        have = {(m.step, m.value) for m in c.get_metric_history(run_id, key)}
        metrics += [Metric(key, float(v), now, int(s)) for s, v in points if (int(s), float(v)) not in have]
    tag_list = [RunTag(k, str(v)[:MAX_TAG_LENGTH]) for k, v in tags.items()]
    for i in range(0, len(params), _BATCH):
        c.log_batch(run_id, params=params[i : i + _BATCH])
    for i in range(0, len(tag_list), _BATCH):
        c.log_batch(run_id, tags=tag_list[i : i + _BATCH])
    for i in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[i : i + 1000])


def _log_datasets(c, run, records: list[dict[str, Any]]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    have = {(d.dataset.name, d.dataset.digest) for d in (run.inputs.dataset_inputs if run.inputs else [])}
    inputs = [
        DatasetInput(
            Dataset(r["name"], r["digest"], r["source_type"], r["source"], r.get("schema"), r.get("profile")),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, r["context"])],
        )
        for r in records
        if (r["name"], r["digest"]) not in have
    ]
    if inputs:
        c.log_inputs(run.info.run_id, datasets=inputs)


def _log_artifacts(c, run_id: str, artifacts: list[dict[str, Any]], base_dir: Path | None) -> None:
    for a in artifacts:
        path = Path(a["path"])
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.exists():  # not an outage: retrying cannot bring it back
            raise UserError(
                f"{path}: to be sent to MLflow as artifact `{a.get('artifact_path') or '/'}` but it "
                "is gone; re-run the stage that wrote it, then `kubetune register`"
            )
        dest = a.get("artifact_path") or None
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        size = sum(p.stat().st_size for p in files)
        log.info("MLflow: uploading %s -> artifacts/%s (%d file(s), %.1f MB)", path, dest or "", len(files), size / 1e6)
        if path.is_dir():
            c.log_artifacts(run_id, str(path), dest)
        else:
            c.log_artifact(run_id, str(path), dest)


def _find_or_create_version(c, name: str, run, spec: dict[str, Any]):
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(
            name, description=f"LoRA/QLoRA adapters fine-tuned by kubetune; alias `{ALIAS}` marks the promoted one."
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run_id = run.info.run_id
    found = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if found:
        mv = min(found, key=lambda v: int(v.version))
        for k, v in spec["tags"].items():  # a version created before the tags could be set
            if mv.tags.get(k) != v:
                c.set_model_version_tag(name, mv.version, k, v)
        return c.get_model_version(name, mv.version)
    # The source is the run's artifact location itself, not runs:/<id>/...: resolving runs:/ makes the reader look
    # the run up in *its* tracking store (with none configured, MLflow quietly creates ./mlflow.db). A local store's
    # source is then a plain absolute path; a server's is mlflow-artifacts:/..., served by that server.
    source = f"{run.info.artifact_uri.rstrip('/')}/{spec['artifact_path']}"
    return c.create_model_version(
        name, source=source, run_id=run_id, tags=spec["tags"], description=spec.get("description"), await_creation_for=0
    )


def send(
    payload: dict[str, Any],
    *,
    base_dir: str | Path | None = None,
    retry: Retry | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Make MLflow hold ``payload`` (idempotent), run the promotion gate, return what happened:
    ``{"tracking_uri", "experiment", "experiment_id", "run_id", "model_name", "version", "promotion",
    "promotion_reason", "champion_version"}``. Raises :class:`TrackingUnavailable` after the retries."""
    retry = retry or Retry()
    uri = payload["tracking_uri"]
    base = Path(base_dir) if base_dir is not None else None
    progress: dict[str, Any] = {}

    def attempt() -> dict[str, Any]:
        c = client(uri)
        spec = payload["run"]
        exp_id = _experiment_id(c, uri, payload["experiment"])
        run = _find_run(c, exp_id, spec["key"])
        if run is None:
            run = c.create_run(exp_id, run_name=spec.get("name"), tags={TAG_RUN_KEY: spec["key"]})
            log.info("MLflow at %s: created run %s in experiment %r", uri, run.info.run_id, payload["experiment"])
        else:
            log.info(
                "MLflow at %s: found run %s for kubetune run %s; completing it", uri, run.info.run_id, spec["key"][:12]
            )
        run_id = run.info.run_id
        progress.update(run_id=run_id, experiment_id=exp_id)
        _log_run_data(c, run, spec)
        _log_datasets(c, run, spec.get("datasets") or [])
        _log_artifacts(c, run_id, spec.get("artifacts") or [], base)
        c.set_terminated(run_id, "FINISHED")
        model = payload["model"]
        mv = _find_or_create_version(c, model["name"], run, model)
        progress["version"] = mv.version
        gate = payload["gate"]
        result = promote(
            c,
            model["name"],
            mv,
            eval_loss=gate["eval_loss"],
            base_eval_loss=gate["base_eval_loss"],
            min_improvement=gate["min_improvement"],
            run_id=run_id,
        )
        log.info(
            "MLflow: %s version %s %s: %s", model["name"], mv.version, result["promotion"], result["promotion_reason"]
        )
        return {
            "tracking_uri": uri,
            "experiment": payload["experiment"],
            "experiment_id": exp_id,
            "run_id": run_id,
            "model_name": model["name"],
            "version": str(mv.version),
            **result,
        }

    return with_retries(attempt, retry, uri, progress, sleep=sleep)


# --------------------------------------------------------------------------------------------------------------
# The promotion protocol over MLflow's model registry


def _version(mv) -> promotion.Version:
    return promotion.Version(
        version=str(mv.version),
        tags=dict(mv.tags or {}),
        run_id=mv.run_id or None,
        creation_timestamp=int(mv.creation_timestamp or 0),
    )


class MlflowRegistry:
    """:class:`kubetune.promotion.Registry` over one registered model of an ``MlflowClient``."""

    def __init__(self, c, name: str):
        self.client, self.name = c, name

    def champion(self) -> promotion.Version | None:
        mv = champion(self.client, self.name)
        return _version(mv) if mv is not None else None

    def get(self, version: str) -> promotion.Version | None:
        from mlflow.exceptions import MlflowException

        try:
            return _version(self.client.get_model_version(self.name, version))
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def versions(self) -> list[promotion.Version]:
        return [_version(mv) for mv in self.client.search_model_versions(f"name = '{self.name}'")]

    def set_alias(self, version: str) -> None:
        self.client.set_registered_model_alias(self.name, ALIAS, version)

    def tag_version(self, version: str, tags) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(self.name, version, k, v)

    def tag_run(self, run_id: str, tags) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)

    def run_metric(self, run_id: str, key: str) -> float | None:
        return self.client.get_run(run_id).data.metrics.get(key)


def champion(c, name: str):
    """The MLflow model version holding alias ``champion`` (None when no version does or the model does not
    exist)."""
    from mlflow.exceptions import MlflowException

    try:
        version = c.get_registered_model(name).aliases.get(ALIAS)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return c.get_model_version(name, str(version)) if version is not None else None


def promote(
    c,
    name: str,
    mv,
    *,
    eval_loss: float,
    base_eval_loss: float,
    min_improvement: float,
    run_id: str | None,
    window_s: float = RACE_WINDOW_S,
    rounds: int = 5,
) -> dict[str, Any]:
    """:func:`kubetune.promotion.promote` for MLflow model version ``mv`` of registered model ``name``, deciding
    with this module's :func:`decide`."""
    return promotion.promote(
        MlflowRegistry(c, name),
        _version(mv),
        eval_loss=eval_loss,
        base_eval_loss=base_eval_loss,
        min_improvement=min_improvement,
        run_id=run_id,
        window_s=window_s,
        rounds=rounds,
        decide=decide,
    )


def converge(c, name: str, mv, *, window_s: float = RACE_WINDOW_S, rounds: int = 5) -> str | None:
    """:func:`kubetune.promotion.converge` for MLflow model version ``mv`` of registered model ``name``."""
    return promotion.converge(MlflowRegistry(c, name), _version(mv), window_s=window_s, rounds=rounds)


def champion_tag(uri: str, name: str, key: str, retry: Retry | None = None) -> str | None:
    """Tag ``key`` of the current champion version; None when there is none or MLflow is unreachable."""
    retry = retry or Retry(attempts=2, deadline_s=10.0)
    db = sqlite_path(uri)
    if db is not None and not db.exists():  # a local store nobody has written yet: no champion, create nothing
        return None
    try:
        holder = with_retries(lambda: champion(client(uri), name), retry, uri)
    except TrackingUnavailable as err:
        log.warning("%s; treating it as no champion", err)
        return None
    return holder.tags.get(key) if holder is not None else None


# --------------------------------------------------------------------------------------------------------------
# Outbox files


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link ``src`` (file or tree) at ``dest`` when on the same filesystem, else copy: an outbox keeps the
    bytes that were meant to be sent even if the input folder is replaced later (stage outputs are never edited
    in place, only replaced, so a hard link is a faithful snapshot)."""
    if src.is_dir():
        shutil.copytree(src, dest, copy_function=_link_or_copy_file)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy_file(str(src), str(dest))


def _link_or_copy_file(src: str, dest: str) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
