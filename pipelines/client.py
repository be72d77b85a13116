"""Talk to a Kubeflow Pipelines API server: upload the pipeline, submit runs, keep a recurring run in place.

Everything goes through kfp's own ``kfp.Client`` (kfp 2.17.3), which calls these KFP v2beta1 endpoints:

    GET    /apis/v2beta1/healthz                           (also our reachability check)
    GET    /apis/v2beta1/pipelines?filter=...              pipeline id by name
    POST   /apis/v2beta1/pipelines/upload                  new pipeline (multipart `uploadfile`)
    POST   /apis/v2beta1/pipelines/upload_version          new version of a pipeline
    GET    /apis/v2beta1/pipelines/{id}/versions           the latest version
    GET    /apis/v2beta1/experiments?filter=...         experiment by name
    POST   /apis/v2beta1/experiments                    ... or created
    POST   /apis/v2beta1/runs                              a run
    GET    /apis/v2beta1/recurringruns?filter=...          recurring runs by name
    POST   /apis/v2beta1/recurringruns                     a recurring run
    DELETE /apis/v2beta1/recurringruns/{id}                (replace = create + delete: the API has no update)
    POST   /apis/v2beta1/recurringruns/{id}:enable|:disable

The recurring run names the pipeline but no version, so every scheduled run uses the pipeline's latest version
(`kfp.Client.create_recurring_run` insists on a version id, so that one call goes through the generated API
client that kfp.Client wraps).

Authentication: a bearer token from ``KUBETUNE_KFP_TOKEN`` (an IAP / OIDC ID token), else the service-account
token KFP projects into pods (``/var/run/secrets/kubeflow/pipelines/token``), else the pod's default
service-account token, else none (a port-forward to an unauthenticated API). Failures come back as one line:
:class:`KfpRefused` (4xx and bad state; exit code 2) or :class:`KfpUnavailable` (unreachable, timeouts, 5xx;
exit code 1).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.errors import EXIT_FAILURE, UserError

TOKEN_ENV = "KUBETUNE_KFP_TOKEN"
TOKEN_FILES = (
    "/var/run/secrets/kubeflow/pipelines/token",  # projected by KFP for pipelines.kubeflow.org
    "/var/run/secrets/kubernetes.io/serviceaccount/token",  # the pod's default service account
)
DEFAULT_TIMEOUT_S = 30.0


class KfpRefused(UserError):
    """The KFP API refused the request (4xx) or the server holds a state we cannot act on. Exit code 2."""


class KfpUnavailable(Exception):
    """The KFP API could not be reached, timed out or failed (5xx). Exit code 1."""

    exit_code = EXIT_FAILURE


def resolve_token(
    env: Mapping[str, str] | None = None, token_files: tuple[str, ...] | None = None
) -> tuple[str | None, str]:
    """The bearer token to send and where it came from (``(None, "none")`` when there is none)."""
    env = os.environ if env is None else env
    token_files = TOKEN_FILES if token_files is None else token_files
    token = (env.get(TOKEN_ENV) or "").strip()
    if token:
        return token, f"${TOKEN_ENV}"
    for path in token_files:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if token:
            return token, path
    return None, "none"


def normalize_host(host: str) -> str:
    host = (host or "").strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", host):
        raise UserError(
            f"--host {host!r}: expected the KFP API base URL, e.g. http://localhost:8080 (a "
            "port-forward to ml-pipeline-ui) or https://kubeflow.example.com/pipeline"
        )
    return host


def server_message(body: Any) -> str:
    """The message of an API server's error body (JSON ``message``/``error``, else the text), one line, at most
    300 characters. The KFP client and the TrainJob client (pipelines/trainjob.py) both report with it."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        text = str(data.get("message") or data.get("error") or text)
    text = " ".join(text.split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _auth_hint(status: int) -> str:
    if status in (401, 403):
        return (
            f"; set {TOKEN_ENV} to a bearer token the deployment accepts (IAP / OIDC), or run in-cluster "
            "with a service account allowed to use KFP"
        )
    return ""


@contextlib.contextmanager
def _translate(host: str, what: str) -> Iterator[None]:
    """Turn transport and HTTP failures of ``what`` into one-line KfpRefused / KfpUnavailable errors."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as err:
        status = int(err.status or 0)
        message = server_message(err.body) or str(err.reason or "")
        if status == 0:
            raise KfpUnavailable(f"{host}: {what}: cannot reach the KFP API ({message})") from None
        if 400 <= status < 500:
            raise KfpRefused(f"{host}: {what} refused: HTTP {status} {message}{_auth_hint(status)}") from None
        raise KfpUnavailable(f"{host}: {what} failed on the server: HTTP {status} {message}") from None
    except urllib3.exceptions.HTTPError as err:
        raise _unreachable(f"{host}: {what}", err) from None
    except ValueError as err:  # kfp.Client's own checks, e.g. two pipelines with one name
        raise KfpRefused(f"{host}: {what}: {err}") from None


def _unreachable(where: str, err: Exception) -> KfpUnavailable:
    """``where: cannot reach the KFP API (why); check --host ...`` for a transport error (urllib3)."""
    reason = getattr(err, "reason", None) or err
    return KfpUnavailable(
        f"{where}: cannot reach the KFP API ({_short(reason)}); check --host and that the port-forward or ingress is up"
    )


def _short(reason: Any) -> str:
    text = " ".join(str(reason).split())
    match = re.search(
        r"(Connection refused|timed out|Name or service not known|No route to host|"
        r"Temporary failure in name resolution|certificate verify failed)",
        text,
    )
    return match.group(1) if match else text[:200]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """kfp.Client prints links and warns about versions; we print our own one-line results."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _preflight(host: str, token: str | None, timeout: float) -> None:
    """GET /apis/v2beta1/healthz with a short timeout: a clear error before kfp.Client's retry loop."""
    import urllib3

    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=timeout, read=timeout), retries=False)
    try:
        response = http.request("GET", f"{host}/apis/v2beta1/healthz", headers=headers)
    except urllib3.exceptions.HTTPError as err:
        raise _unreachable(host, err) from None
    status = response.status
    if status >= 400:
        message = server_message(response.data)
        if status < 500:
            raise KfpRefused(
                f"{host}: the KFP API refused the connection check: HTTP {status} {message}{_auth_hint(status)}"
            )
        raise KfpUnavailable(f"{host}: the KFP API is unhealthy: HTTP {status} {message}")
    try:
        json.loads(response.data or b"{}")
    except ValueError:
        raise KfpRefused(
            f"{host}: answered /apis/v2beta1/healthz with something other than JSON; is this the "
            "KFP API (or a login page in front of it)?"
        ) from None


@dataclass
class Connection:
    """A kfp.Client for ``host`` plus what we need to print links and translate errors."""

    host: str
    ui: str
    client: Any
    namespace: str | None
    token_source: str

    def call(self, what: str, fn, *args, **kwargs) -> Any:
        with _translate(self.host, what), _quiet():
            return fn(*args, **kwargs)

    def link(self, kind: str, *ids: str) -> str:
        paths = {
            "run": "#/runs/details/{}",
            "pipeline": "#/pipelines/details/{}/version/{}",
            "recurring": "#/recurringrun/details/{}",
            "experiment": "#/experiments/details/{}",
        }
        return f"{self.ui}/{paths[kind].format(*ids)}"


def connect(
    host: str,
    *,
    namespace: str | None = None,
    ui_host: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    token_files: tuple[str, ...] | None = None,
) -> Connection:
    """Check that ``host`` answers as a KFP API, then return a connected kfp.Client (with timeouts)."""
    import kfp
    import urllib3

    host = normalize_host(host)
    ui = normalize_host(ui_host) if ui_host else host
    token, source = resolve_token(env, token_files)
    _preflight(host, token, timeout)
    with _translate(host, "connect"), _quiet():
        # namespace "kubeflow" is kfp.Client's "not set"; a real one also skips its healthz retry loop.
        client = kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow", ui_host=ui)
    # kfp.Client sets no timeout: a hung server would hang the CLI. All its service APIs share one ApiClient.
    pool = client._run_api.api_client.rest_client.pool_manager
    pool.connection_pool_kw["timeout"] = urllib3.Timeout(connect=timeout, read=max(timeout, 120.0))
    return Connection(host=host, ui=ui, client=client, namespace=namespace, token_source=source)


# ------------------------------------------------------------------------------------------------
# Operations


def _equals(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pipeline_id(conn: Connection, name: str) -> str | None:
    return conn.call(f"look up pipeline {name!r}", conn.client.get_pipeline_id, name)


def _latest_version(conn: Connection, pipeline_id: str, name: str) -> Any:
    response = conn.call(
        f"list versions of pipeline {name!r}",
        conn.client.list_pipeline_versions,
        pipeline_id,
        page_size=1,
        sort_by="created_at desc",
    )
    versions = response.pipeline_versions or []
    if not versions:
        raise KfpRefused(f"{conn.host}: pipeline {name!r} has no versions; run `kubetune pipeline upload` first")
    return versions[0]


def upload(
    conn: Connection,
    package: str | Path,
    name: str,
    *,
    version: str | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """Upload ``package`` as pipeline ``name``, or as a new version of it; idempotent by content.

    Every version's description carries the file's sha256; when the pipeline's latest version already has this
    file's, nothing is uploaded. New versions are named ``<name>-<UTC time>-<sha256, 12 hex>`` by default.
    """
    package = Path(package)
    if not package.is_file():
        raise UserError(
            f"{package}: not found; compile the pipeline first (`kubetune pipeline compile --out {package}`)"
        )
    digest = file_digest(package)
    description = f"{description.strip()} (sha256 {digest})" if description else f"kubetune pipeline, sha256 {digest}"
    pipeline_id = _pipeline_id(conn, name)
    if pipeline_id is None:
        # Creates the pipeline and its first version (named like the pipeline, with this description).
        pipeline = conn.call(
            f"upload pipeline {name!r}",
            conn.client.upload_pipeline,
            str(package),
            pipeline_name=name,
            description=description,
            namespace=conn.namespace,
        )
        first = _latest_version(conn, pipeline.pipeline_id, name)
        return _uploaded(conn, "created", pipeline.pipeline_id, first.pipeline_version_id, first.display_name)
    latest = _latest_version(conn, pipeline_id, name)
    if digest in (latest.description or ""):
        return _uploaded(conn, "unchanged", pipeline_id, latest.pipeline_version_id, latest.display_name)
    version = version or f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{digest[:12]}"
    created = conn.call(
        f"upload a version of pipeline {name!r}",
        conn.client.upload_pipeline_version,
        str(package),
        pipeline_version_name=version,
        pipeline_id=pipeline_id,
        description=description,
    )
    return _uploaded(conn, "version-added", pipeline_id, created.pipeline_version_id, version)


def _uploaded(conn: Connection, action: str, pipeline_id: str, version_id: str, version: str) -> dict[str, Any]:
    """What :func:`upload` returns: the action taken and the pipeline version it left current, with its link."""
    return {
        "action": action,
        "pipeline_id": pipeline_id,
        "version_id": version_id,
        "version": version,
        "link": conn.link("pipeline", pipeline_id, version_id),
    }


def _experiment_id(conn: Connection, experiment: str) -> str:
    found = conn.call(
        f"get or create experiment {experiment!r}",
        conn.client.create_experiment,
        experiment,
        namespace=conn.namespace,
    )
    return found.experiment_id


def submit(
    conn: Connection,
    arguments: Mapping[str, Any],
    *,
    experiment: str,
    run_name: str,
    pipeline: str | None = None,
    package: str | Path | None = None,
    service_account: str = "",
) -> dict[str, Any]:
    """Run ``arguments`` on the latest version of ``pipeline`` or of a compiled ``package``."""
    if (pipeline is None) == (package is None):
        raise ValueError("pass exactly one of pipeline, package")  # programming error
    if package is not None and not Path(package).is_file():
        raise UserError(f"{package}: not found; compile the pipeline first (`kubetune pipeline compile`)")
    experiment_id = _experiment_id(conn, experiment)
    if package is not None:
        run = conn.call(
            "create the run",
            conn.client.run_pipeline,
            experiment_id,
            run_name,
            pipeline_package_path=str(package),
            params=dict(arguments),
            service_account=service_account or None,
        )
        version = None
    else:
        pipeline_id = _pipeline_id(conn, pipeline)
        if pipeline_id is None:
            raise KfpRefused(
                f"{conn.host}: no pipeline named {pipeline!r}; upload it first (`kubetune pipeline "
                "upload --host ...`) or pass --file build/sft_pipeline.yaml"
            )
        version = _latest_version(conn, pipeline_id, pipeline)
        run = conn.call(
            "create the run",
            conn.client.run_pipeline,
            experiment_id,
            run_name,
            pipeline_id=pipeline_id,
            version_id=version.pipeline_version_id,
            params=dict(arguments),
            service_account=service_account or None,
        )
    return {
        "run_id": run.run_id,
        "experiment_id": experiment_id,
        "link": conn.link("run", run.run_id),
        "version": getattr(version, "display_name", None),
    }


# ------------------------------------------------------------------------------------------------
# Recurring runs


def normalize_cron(cron: str) -> str:
    """KFP's scheduler reads 6-field cron (seconds first); a 5-field crontab line gets ``0`` seconds."""
    fields = (cron or "").split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6 or not all(re.fullmatch(r"[0-9A-Za-z*/,?#LW-]+", f) for f in fields):
        raise UserError(
            f"--cron {cron!r}: expected a cron expression, 5 fields (minute hour day month weekday, "
            "e.g. '0 3 * * *') or 6 with seconds first ('0 0 3 * * *')"
        )
    return " ".join(fields)


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    return float(value) if math.isfinite(value) else value


def _canonical(parameters: Mapping[str, Any] | None) -> str:
    """Parameters compared across the API round trip (JSON numbers come back as int or float)."""

    def norm(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return _number(v)

    return json.dumps(norm(dict(parameters or {})), sort_keys=True)


def _find_recurring(conn: Connection, name: str, experiment_id: str) -> list[Any]:
    response = conn.call(
        f"look up recurring run {name!r}",
        conn.client.list_recurring_runs,
        experiment_id=experiment_id,
        page_size=100,
        filter=_equals(name),
    )
    return [r for r in (response.recurring_runs or []) if r.display_name == name]


def _same_schedule(
    existing: Any, *, pipeline_id: str, cron: str, arguments: Mapping[str, Any], service_account: str
) -> bool:
    ref = existing.pipeline_version_reference
    trigger = existing.trigger.cron_schedule if existing.trigger else None
    return (
        ref is not None
        and ref.pipeline_id == pipeline_id
        and not ref.pipeline_version_id
        and trigger is not None
        and trigger.cron == cron
        and str(existing.max_concurrency) == "1"
        and bool(existing.no_catchup)
        and (existing.service_account or "") == service_account
        and _canonical(existing.runtime_config.parameters if existing.runtime_config else None) == _canonical(arguments)
    )


def schedule(
    conn: Connection,
    name: str,
    *,
    pipeline: str,
    experiment: str,
    cron: str | None = None,
    arguments: Mapping[str, Any] | None = None,
    action: str = "apply",
    service_account: str = "",
) -> dict[str, Any]:
    """Create or update (``apply``), ``pause``, ``resume`` or ``delete`` the recurring run ``name``.

    ``apply`` is idempotent: an identical recurring run is left alone; a different one is replaced (the API
    has no update), keeping its paused / enabled state. Runs follow the pipeline's latest version, at most one
    at a time, and missed intervals are not caught up.
    """
    import kfp_server_api as api

    experiment_id = _experiment_id(conn, experiment)
    found = _find_recurring(conn, name, experiment_id)
    if len(found) > 1:
        raise KfpRefused(
            f"{conn.host}: {len(found)} recurring runs are named {name!r} in experiment "
            f"{experiment!r}; delete the extra ones in the UI, then run this again"
        )
    existing = found[0] if found else None
    runs = conn.client.recurring_runs  # the generated RecurringRunService API that kfp.Client wraps

    if action in ("pause", "resume", "delete"):
        if existing is None:
            raise KfpRefused(f"{conn.host}: no recurring run named {name!r} in experiment {experiment!r}")
        rid = existing.recurring_run_id
        if action == "delete":
            conn.call(f"delete recurring run {name!r}", runs.recurring_run_service_delete_recurring_run, rid)
        elif action == "pause":
            conn.call(f"pause recurring run {name!r}", runs.recurring_run_service_disable_recurring_run, rid)
        else:
            conn.call(f"resume recurring run {name!r}", runs.recurring_run_service_enable_recurring_run, rid)
        return {
            "action": {"pause": "paused", "resume": "resumed", "delete": "deleted"}[action],
            "recurring_run_id": rid,
            "link": conn.link("recurring", rid),
        }
    if action != "apply":
        raise ValueError(f"unknown action {action!r}")  # programming error
    if cron is None:
        raise UserError(
            "--cron is required to create or update a recurring run (or pass --pause, --resume or --delete)"
        )
    cron = normalize_cron(cron)
    arguments = dict(arguments or {})
    pipeline_id = _pipeline_id(conn, pipeline)
    if pipeline_id is None:
        raise KfpRefused(
            f"{conn.host}: no pipeline named {pipeline!r}; upload it first (`kubetune pipeline upload --host ...`)"
        )
    _latest_version(conn, pipeline_id, pipeline)  # refuse early if nothing was ever uploaded
    same = existing is not None and _same_schedule(
        existing, pipeline_id=pipeline_id, cron=cron, arguments=arguments, service_account=service_account
    )
    if same:
        return {
            "action": "unchanged",
            "recurring_run_id": existing.recurring_run_id,
            "cron": cron,
            "link": conn.link("recurring", existing.recurring_run_id),
        }
    enabled = existing is None or existing.mode != api.RecurringRunMode.DISABLE
    body = api.V2beta1RecurringRun(
        display_name=name,
        description=f"kubetune recurring fine-tune of pipeline {pipeline!r} (managed by `kubetune pipeline schedule`)",
        experiment_id=experiment_id,
        # No version id: every scheduled run uses the pipeline's latest version.
        pipeline_version_reference=api.V2beta1PipelineVersionReference(pipeline_id=pipeline_id),
        runtime_config=api.V2beta1RuntimeConfig(parameters=arguments),
        trigger=api.V2beta1Trigger(cron_schedule=api.V2beta1CronSchedule(cron=cron)),
        max_concurrency="1",
        no_catchup=True,
        mode=api.RecurringRunMode.ENABLE if enabled else api.RecurringRunMode.DISABLE,
        namespace=conn.namespace,
        service_account=service_account or None,
    )
    # Create first, then delete the old one: a refused create leaves the old schedule in place.
    created = conn.call(f"create recurring run {name!r}", runs.recurring_run_service_create_recurring_run, body)
    if existing is not None:
        conn.call(
            f"delete the replaced recurring run {name!r}",
            runs.recurring_run_service_delete_recurring_run,
            existing.recurring_run_id,
        )
    return {
        "action": "replaced" if existing is not None else "created",
        "recurring_run_id": created.recurring_run_id,
        "cron": cron,
        "enabled": enabled,
        "link": conn.link("recurring", created.recurring_run_id),
    }
