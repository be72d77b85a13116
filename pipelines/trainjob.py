"""Multi-node training: with ``train_nodes`` > 1 the pipeline's train task runs a Kubeflow Trainer ``TrainJob``.

The train task (``components.stages.train``, either pool) calls :func:`train`. With one node it trains in its own
pod, exactly as before. With N > 1 it becomes the TrainJob's supervisor:

1. checks the request (:func:`check`): N >= 1, a checkpoint volume the nodes share, ``checkpoint_root`` on it;
   one-line :class:`~kubetune.errors.UserError` otherwise, before anything is written;
2. stages the inputs on the shared volume (pods of a TrainJob cannot read KFP artifacts), in
   ``<checkpoint_root>/<run id>/trainjob/`` (the run's checkpoint folder, the same for every retry)::

       packed/        the packed dataset, copied from the task's input artifact (manifest.json copied last)
       config.yaml    the resolved config; train.checkpoint_dir is the run's checkpoint folder
       adapter/       written by global rank 0 (`kubetune train --out`); copied into the task's output artifact

3. builds the TrainJob (:func:`build`): the pool's ClusterTrainingRuntime (``placement.TRAINING_RUNTIMES``), the
   task's image, N nodes of one process each running ``torchrun --no-python kubetune train --config ... --packed
   ... --out ...`` (torchrun reads the ``PET_*`` variables Trainer's torch runtime sets), ``placement.RESOURCES``
   of the train task per node (and the GPU on the GPU pool), and through a runtime patch the pool's node selector
   and tolerations, the pod labels, the task's service account, the checkpoint claim at the same mount path and
   the GCS FUSE annotation. Every object is checked against the Trainer v2.3 API models (``kubeflow-trainer-api``)
   by a round trip that must give the object back unchanged (:func:`validate`);
4. submits it (:func:`submit`) with an owner reference to the task's own pod (``KFP_POD_NAME`` / ``KFP_POD_UID``,
   which KFP's backend sets on every executor pod), named ``kubetune-<run id>-<attempt>``, the attempt being the
   task pod's uid: a KFP retry (a new pod) submits a new TrainJob, a repeated create of the same attempt (a create
   whose answer was lost) adopts the existing one. TrainJobs of earlier attempts of the run still present (their
   task was killed before it could clean up) are deleted first, and waited for, so two jobs never write the same
   checkpoints;
5. waits for its ``Complete`` or ``Failed`` condition (polled every :data:`POLL_S` s; the TrainJob's
   ``activeDeadlineSeconds`` is :data:`DEADLINE_S`, and the task gives up :data:`WAIT_MARGIN_S` later), streams
   the rank-0 pod's log into the task's log (found by the JobSet labels; a replacement pod is followed) and logs
   each change of the TrainJob's status;
6. maps the outcome: ``Complete`` -> the adapter is copied into the task's output; preempted (rank 0 wrote
   ``<checkpoint dir>/kubetune-preempted.json`` after this TrainJob was created, or a pod of it was evicted or
   disrupted by a node drain) -> :class:`TrainJobPreempted` (a :class:`~kubetune.errors.Preempted`: the task
   exits 3 and KFP's retry submits a new TrainJob that resumes from the newest sealed checkpoint); ``Failed`` ->
   :class:`TrainJobFailed` naming the first pod that failed, its exit code and its last lines;
7. deletes the TrainJob when it ends, whatever the outcome, on SIGTERM to the task too. The owner reference makes
   Kubernetes' garbage collector delete it with the task's pod (deleting the KFP run deletes its pods), should the
   task die before it can.

Kubernetes API calls, all in the run's namespace (the RBAC the task's service account needs, nothing more):
``trainer.kubeflow.org/trainjobs``: create, get, list, delete; ``pods``: get (the task's own pod), list (the
TrainJob's pods, by label); ``pods/log``: get (rank 0's stream, the failing pod's last lines).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from kubetune.checkpoints import PREEMPTED_FILE
from kubetune.errors import Preempted, UserError
from pipelines import placement
from pipelines.client import server_message

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
RUNTIME_KIND = "ClusterTrainingRuntime"
PATCH_MANAGER = "kubetune.io/pipeline"  # owner of the TrainJob's runtime patch
NODE = placement.TRAINJOB_CONTAINER  # the torch runtime's replicated job and its trainer container
PROCS_PER_NODE = 1  # one rank per node: all of a C3 node's cores (threads per rank), or its one GPU

# Labels the JobSet and Job controllers put on a TrainJob's pods (the JobSet is named after the TrainJob).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# kubetune's labels on the TrainJob: which run, which attempt (the task pod's uid, shortened).
RUN_ID_LABEL = "kubetune.io/run-id"
ATTEMPT_LABEL = "kubetune.io/attempt"

COMPLETE, FAILED = "Complete", "Failed"  # the TrainJob's terminal condition types
WORK_FOLDER = "trainjob"  # under the run's checkpoint folder
VOLUME = "kubetune-checkpoints"  # the volume's name inside the TrainJob's pods

DEADLINE_S = 24 * 3600  # the TrainJob's activeDeadlineSeconds: Trainer fails it (DeadlineExceeded) after a day
WAIT_MARGIN_S = 15 * 60  # the task waits this much longer than the deadline, then deletes the TrainJob
POLL_S = 10.0
STALE_TIMEOUT_S = 300.0  # how long a TrainJob of an earlier attempt may take to go away
LOG_TAIL_LINES = 30  # lines of the failing pod's log in the failure message
TRANSIENT = frozenset({429, 500, 502, 503, 504})  # API answers worth retrying
_DISRUPTION_REASONS = frozenset({"Evicted", "Preempting", "Shutdown", "NodeShutdown", "Terminated"})
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class TrainJobFailed(RuntimeError):
    """The TrainJob ended ``Failed`` (or could not be run); the message names the pod and its last lines."""


class TrainJobPreempted(Preempted):
    """The TrainJob's nodes (or the task's own pod) were preempted; exit 3, the KFP retry resumes."""

    def __init__(self, message: str, step: int | None = None, checkpoint: str | None = None):
        Exception.__init__(self, message)
        self.step = step
        self.checkpoint = checkpoint


class _Terminated(BaseException):
    """SIGTERM reached the train task (its node drained, the run cancelled); not an Exception, so nothing on the
    way up swallows it before the TrainJob is deleted."""


@dataclass(frozen=True)
class Owner:
    """The train task's own pod: the TrainJob's owner, and the service account its pods run as."""

    name: str
    uid: str
    service_account: str

    @property
    def attempt(self) -> str:
        """The attempt's id in names and labels: the pod uid's first 8 hex digits (a KFP retry is a new pod)."""
        return self.uid.replace("-", "")[:8].lower()


# --- the request and the object --------------------------------------------------------------------------------


def check_nodes(nodes: Any) -> int:
    """``train_nodes`` as an int >= 1, else a UserError."""
    if isinstance(nodes, float) and nodes.is_integer():
        nodes = int(nodes)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise UserError(
            f"pipeline parameter `train_nodes`: {nodes!r} is not a node count; give 1 (train in the task's pod) "
            "or more (a TrainJob over that many nodes)"
        )
    return nodes


def _under(path: str, root: str) -> bool:
    p, r = PurePosixPath(os.path.normpath(path)), PurePosixPath(os.path.normpath(root))
    return p.is_absolute() and (p == r or r in p.parents)


def check(
    nodes: Any,
    *,
    pool: str,
    image: str,
    checkpoint_pvc: str,
    checkpoint_dir: str | None,
    mount: str = placement.CHECKPOINT_MOUNT,
) -> int:
    """Refuse a multi-node request that cannot work, with one line naming the parameter; returns ``nodes``."""
    from pipelines.images import check_reference

    nodes = check_nodes(nodes)
    if pool not in placement.POOLS:
        raise UserError(f"train pool {pool!r}: expected one of {', '.join(placement.POOLS)}")
    check_reference(image, "train image")
    if nodes == 1:
        return nodes
    if not (checkpoint_pvc or "").strip():
        raise UserError(
            f"pipeline parameter `train_nodes`: {nodes} nodes need a checkpoint volume they all mount, and this "
            "pipeline was compiled without one; compile with --checkpoint-pvc CLAIM (`make compile` does) or set "
            "train_nodes to 1"
        )
    if not checkpoint_dir:
        raise UserError(
            f"pipeline parameter `checkpoint_root`: empty, but train_nodes {nodes} keeps its inputs, checkpoints "
            f"and adapter on the shared checkpoint volume; leave it at its compiled default {mount}"
        )
    if not _under(checkpoint_dir, mount):
        raise UserError(
            f"pipeline parameter `checkpoint_root`: {str(Path(checkpoint_dir).parent)!r} is not on the checkpoint "
            f"volume mounted at {mount}, the only storage the {nodes} nodes share; use {mount} (the compiled "
            "default) or a folder under it"
        )
    return nodes


def job_name(run_id: str, attempt: str) -> str:
    """``kubetune-<run id>-<attempt>``: an RFC 1035 label of at most 63 characters, the same for the same inputs.
    A KFP run id (a UUID) and an 8-digit attempt fit as they are; anything else is cleaned and gets a hash suffix,
    so two different inputs never give one name."""
    raw = f"kubetune-{run_id}-{attempt}".lower()
    name = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", raw)).strip("-")
    if name != raw or len(name) > 63:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = f"{name[: 63 - 9].rstrip('-')}-{digest}"
    return name


def label_value(value: str) -> str:
    """``value`` as a Kubernetes label value (<= 63 of ``[A-Za-z0-9._-]``, alphanumeric at both ends)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:63].strip("-._")
    return cleaned


def work_paths(work_dir: str) -> dict[str, str]:
    """The files of the work folder, as the TrainJob's pods see them (the same path as in the task's pod)."""
    w = PurePosixPath(work_dir)
    return {"config": str(w / "config.yaml"), "packed": str(w / "packed"), "adapter": str(w / "adapter")}


def command(work_dir: str) -> list[str]:
    """What each node runs: torchrun (world size and rank from Trainer's ``PET_*`` variables) over the train stage."""
    p = work_paths(work_dir)
    return [
        "torchrun",
        "--no-python",
        "kubetune",
        "train",
        "--config",
        p["config"],
        "--packed",
        p["packed"],
        "--out",
        p["adapter"],
    ]


def env() -> list[dict[str, Any]]:
    """The trainer container's environment: what the single-node train task gets (HF_TOKEN from the optional
    Secret, MLFLOW_TRACKING_URI from the optional ConfigMap), and unbuffered output for the log stream."""
    secret, secret_key = placement.HF_SECRET
    configmap, configmap_key = placement.SETTINGS_CONFIGMAP
    return [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": secret_key, "valueFrom": {"secretKeyRef": {"name": secret, "key": secret_key, "optional": True}}},
        {
            "name": configmap_key,
            "valueFrom": {"configMapKeyRef": {"name": configmap, "key": configmap_key, "optional": True}},
        },
    ]


def resources(pool: str) -> dict[str, dict[str, str]]:
    """Requests and limits per node: the single-node train task's (``placement.RESOURCES``), plus the GPU."""
    r = placement.RESOURCES[f"train-{pool}"]
    limits = {"cpu": r["cpu_limit"], "memory": r["memory_limit"]}
    if pool == "gpu":
        limits[placement.GPU_RESOURCE] = str(placement.GPU_COUNT)
    return {"requests": {"cpu": r["cpu_request"], "memory": r["memory_request"]}, "limits": limits}


def pod_labels(pool: str) -> dict[str, str]:
    """The labels of the TrainJob's pods: the pipeline's pod labels and the train task's stage."""
    return {**placement.POD_LABELS, placement.STAGE_LABEL_KEY: f"train-{pool}"}


def _pod_patch(
    pool: str, *, checkpoint_pvc: str, checkpoint_gcsfuse: bool, service_account: str, mount: str
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": pod_labels(pool)}
    if checkpoint_gcsfuse:
        metadata["annotations"] = dict([placement.GCSFUSE_ANNOTATION])
    return {
        "metadata": metadata,
        "spec": {
            "serviceAccountName": service_account,
            "nodeSelector": placement.node_selector(pool),
            "tolerations": placement.tolerations(pool),
            "volumes": [{"name": VOLUME, "persistentVolumeClaim": {"claimName": checkpoint_pvc}}],
            "containers": [{"name": NODE, "volumeMounts": [{"name": VOLUME, "mountPath": mount}]}],
        },
    }


def runtime_patch(
    pool: str, *, checkpoint_pvc: str, checkpoint_gcsfuse: bool, service_account: str, mount: str
) -> dict[str, Any]:
    """kubetune's patch of the runtime's node job: its pod template gets the pool, the identity and the volume."""
    pod = _pod_patch(
        pool,
        checkpoint_pvc=checkpoint_pvc,
        checkpoint_gcsfuse=checkpoint_gcsfuse,
        service_account=service_account,
        mount=mount,
    )
    node_job = {"name": NODE, "template": {"spec": {"template": pod}}}
    return {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node_job]}}}}


def build(
    nodes: int,
    pool: str,
    *,
    name: str,
    image: str,
    checkpoint_pvc: str,
    work_dir: str,
    checkpoint_gcsfuse: bool = False,
    namespace: str = placement.RUN_NAMESPACE,
    service_account: str = placement.SERVICE_ACCOUNT,
    owner: Owner | None = None,
    run_id: str = "",
    mount: str = placement.CHECKPOINT_MOUNT,
    deadline_s: int = DEADLINE_S,
) -> dict[str, Any]:
    """The TrainJob for ``nodes`` nodes on ``pool`` (``cpu`` or ``gpu``) as a Kubernetes object (a dict), checked
    against the Trainer API models (:func:`validate`).

    ``work_dir``: the work folder (under ``mount``, where ``checkpoint_pvc`` is mounted); ``owner``: the task's
    pod (an owner reference, the service account, the attempt label); ``run_id``: the run label.
    """
    check_nodes(nodes)
    if pool not in placement.POOLS:
        raise UserError(f"train pool {pool!r}: expected one of {', '.join(placement.POOLS)}")
    if not _DNS_LABEL.match(name) or len(name) > 63:
        raise ValueError(f"TrainJob name {name!r}: not an RFC 1035 label of at most 63 characters")
    if not checkpoint_pvc:
        raise UserError("a TrainJob needs the checkpoint claim (--checkpoint-pvc): its nodes share nothing else")
    if not _under(work_dir, mount):
        raise ValueError(f"work folder {work_dir!r} is not under the checkpoint mount {mount}")
    if not isinstance(deadline_s, int) or deadline_s < 1:
        raise ValueError(f"deadline_s {deadline_s!r}: expected a positive number of seconds")
    labels = {**pod_labels(pool)}
    if run_id:
        labels[RUN_ID_LABEL] = label_value(run_id)
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if owner is not None:
        labels[ATTEMPT_LABEL] = owner.attempt
        service_account = owner.service_account
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": owner.name, "uid": owner.uid}]
    obj = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": placement.TRAINING_RUNTIMES[pool]},
            "activeDeadlineSeconds": deadline_s,
            "trainer": {
                "image": image,
                "command": command(work_dir),
                "env": env(),
                "numNodes": nodes,
                "numProcPerNode": PROCS_PER_NODE,
                "resourcesPerNode": resources(pool),
            },
            "runtimePatches": [
                runtime_patch(
                    pool,
                    checkpoint_pvc=checkpoint_pvc,
                    checkpoint_gcsfuse=checkpoint_gcsfuse,
                    service_account=service_account,
                    mount=mount,
                )
            ],
        },
    }
    return validate(obj)


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path.lstrip(".") or "(root)"]


def validate(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` if the Trainer v2.3 API models (``kubeflow_trainer_api``) accept it and give it back unchanged (a
    field they do not know would be dropped: it is an error here); else ValueError naming the fields."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    from pydantic import ValidationError

    try:
        model = TrainerV1alpha1TrainJob.from_dict(obj)  # the models' own loader (model_validate, nested)
    except ValidationError as err:
        name = obj.get("metadata", {}).get("name")
        raise ValueError(f"TrainJob {name}: not a valid Trainer v2.3 TrainJob: {err}") from None
    back = model.to_dict()
    if back != obj:
        fields = ", ".join(_differences(obj, back))
        raise ValueError(
            f"TrainJob {obj['metadata'].get('name')}: fields the Trainer v2.3 API lacks or changes: {fields}"
        )
    return obj


# --- the inputs on the shared volume ---------------------------------------------------------------------------


def _copy_manifest_last(src: Path, dest: Path) -> None:
    """Copy a stage output so that a copy cut off half-way has no manifest.json (and is never taken as complete),
    without renaming folders (GCS FUSE renames folders only file by file)."""
    from kubetune.artifacts import MANIFEST

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=lambda folder, names: [MANIFEST] if Path(folder) == src else [])
    shutil.copy2(src / MANIFEST, dest / MANIFEST)


def stage_inputs(cfg: Any, packed: str | Path, work: Path) -> None:
    """Put the packed dataset (unless an identical copy is there already) and the resolved config into ``work``."""
    from kubetune.artifacts import read_manifest, write_text_atomic
    from kubetune.config import dump

    packed = Path(packed)
    fingerprint = read_manifest(packed, "pack")["fingerprint"]
    dest = work / "packed"
    work.mkdir(parents=True, exist_ok=True)
    try:
        same = read_manifest(dest, "pack")["fingerprint"] == fingerprint
    except UserError:
        same = False
    if same:
        log.info("%s: the packed dataset is there already (fingerprint %s)", dest, fingerprint[:12])
    else:
        log.info("copying the packed dataset to %s, where every node reads it", dest)
        _copy_manifest_last(packed, dest)
    write_text_atomic(work / "config.yaml", dump(cfg))


def collect(work: Path, out: str | Path, name: str) -> Path:
    """Copy rank 0's adapter folder from the work folder into the task's output artifact ``out``."""
    from kubetune.artifacts import read_manifest

    src = work / "adapter"
    try:
        read_manifest(src, "train")
    except UserError as err:
        raise TrainJobFailed(f"TrainJob {name} completed but left no complete adapter: {err}") from None
    out = Path(out)
    shutil.copytree(src, out, dirs_exist_ok=True)
    log.info("copied the adapter from %s to %s", src, out)
    return out


# --- the Kubernetes API ----------------------------------------------------------------------------------------


class KubernetesError(RuntimeError):
    """The Kubernetes API refused a request (after retries for transient answers)."""


class _AlreadyExists(Exception):
    pass


def _own_namespace(environ: Mapping[str, str]) -> str:
    if environ.get("NAMESPACE"):  # KFP's backend sets it on executor pods (fieldRef metadata.namespace)
        return environ["NAMESPACE"]
    try:
        return Path(_SA_NAMESPACE_FILE).read_text().strip() or placement.RUN_NAMESPACE
    except OSError:
        return placement.RUN_NAMESPACE


def _api_message(err: Any) -> str:
    return server_message(getattr(err, "body", None)) or str(getattr(err, "reason", None) or err)


@dataclass
class Cluster:
    """The Kubernetes API calls this module makes (see the module docstring), each retried on a transient answer
    (429, 5xx) or a broken connection, ``attempts`` times with doubling pauses from ``backoff_s``."""

    custom: Any  # kubernetes.client.CustomObjectsApi
    core: Any  # kubernetes.client.CoreV1Api
    namespace: str
    attempts: int = 5
    backoff_s: float = 1.0
    request_timeout_s: float = 60.0

    @classmethod
    def connect(
        cls, api_client: Any = None, namespace: str | None = None, environ: Mapping[str, str] | None = None, **kw: Any
    ) -> Cluster:
        """In the cluster (the pod's service account) unless ``api_client`` is given."""
        from kubernetes import client, config

        if api_client is None:
            config.load_incluster_config()
            api_client = client.ApiClient()
        ns = namespace or _own_namespace(os.environ if environ is None else environ)
        return cls(client.CustomObjectsApi(api_client), client.CoreV1Api(api_client), ns, **kw)

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        kwargs.setdefault("_request_timeout", self.request_timeout_s)
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except ApiException as err:
                if err.status not in TRANSIENT or attempt == self.attempts:
                    raise
                problem = f"{err.status} {_api_message(err)}"
            except (HTTPError, OSError) as err:
                if attempt == self.attempts:
                    raise KubernetesError(f"Kubernetes API: {what}: {type(err).__name__}: {err}") from None
                problem = f"{type(err).__name__}: {err}"
            log.warning("Kubernetes API: %s: %s; retrying in %.1f s", what, problem, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _refused(self, what: str, err: Any) -> KubernetesError:
        hint = ""
        if err.status == 403:
            hint = "; the train task's service account needs that permission (docs/pipeline.md, Multi-node runs)"
        return KubernetesError(f"Kubernetes API refused to {what} ({err.status}: {_api_message(err)}){hint}")

    def _json(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return json.loads(self.call(what, fn, *args, _preload_content=False, **kwargs).data)
        except ApiException as err:
            if err.status == 404:
                return None
            raise self._refused(what, err) from None

    # TrainJobs
    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        what = f"create TrainJob {obj['metadata']['name']}"
        try:
            return self.call(
                what, self.custom.create_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, obj
            )
        except ApiException as err:
            if err.status == 409:
                raise _AlreadyExists from None
            raise self._refused(what, err) from None

    def get(self, name: str) -> dict[str, Any] | None:
        return self._json(
            f"get TrainJob {name}",
            self.custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            name,
        )

    def list(self, selector: str) -> list[dict[str, Any]]:
        found = self._json(
            f"list TrainJobs {selector}",
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            label_selector=selector,
        )
        return list((found or {}).get("items") or [])

    def delete(self, name: str, propagation: str = "Background") -> bool:
        """Delete the TrainJob (and, through Kubernetes' garbage collector, its JobSet and pods); False if gone."""
        from kubernetes.client.exceptions import ApiException

        what = f"delete TrainJob {name}"
        try:
            self.call(
                what,
                self.custom.delete_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                name,
                propagation_policy=propagation,
            )
            return True
        except ApiException as err:
            if err.status == 404:
                return False
            raise self._refused(what, err) from None

    # pods
    def pod(self, name: str) -> dict[str, Any] | None:
        return self._json(f"get pod {name}", self.core.read_namespaced_pod, name, self.namespace)

    def pods(self, selector: str) -> list[dict[str, Any]]:
        found = self._json(
            f"list pods {selector}", self.core.list_namespaced_pod, self.namespace, label_selector=selector
        )
        return list((found or {}).get("items") or [])

    def log(self, pod: str, tail_lines: int) -> str:
        from kubernetes.client.exceptions import ApiException

        what = f"read the log of pod {pod}"
        try:
            resp = self.call(
                what,
                self.core.read_namespaced_pod_log,
                pod,
                self.namespace,
                container=NODE,
                tail_lines=tail_lines,
                _preload_content=False,
            )
        except ApiException as err:
            raise self._refused(what, err) from None
        return resp.data.decode("utf-8", errors="replace")

    def follow(self, pod: str) -> Any:
        """The pod's log as a streaming response (``follow=true``); the caller reads lines and closes it."""
        return self.call(
            f"follow the log of pod {pod}",
            self.core.read_namespaced_pod_log,
            pod,
            self.namespace,
            container=NODE,
            follow=True,
            _preload_content=False,
            _request_timeout=(self.request_timeout_s, None),
        )


def own_pod(cluster: Cluster, environ: Mapping[str, str]) -> Owner:
    """The train task's pod: ``KFP_POD_NAME`` / ``KFP_POD_UID`` (set by KFP on executor pods; ``HOSTNAME``, the
    pod's name, if absent), read back from the API for its uid and service account."""
    name = environ.get("KFP_POD_NAME") or environ.get("HOSTNAME")
    if not name:
        raise TrainJobFailed(
            "the train task cannot tell which pod it runs in (neither KFP_POD_NAME nor HOSTNAME is set); a "
            "multi-node run needs the task to run as a pod of a Kubeflow Pipelines run"
        )
    pod = cluster.pod(name)
    if pod is None:
        raise TrainJobFailed(f"the train task's own pod {cluster.namespace}/{name} is not in the Kubernetes API")
    uid = pod["metadata"]["uid"]
    expected = environ.get("KFP_POD_UID")
    if expected and expected != uid:
        raise TrainJobFailed(f"pod {name} has uid {uid}, but KFP_POD_UID says {expected}; not the task's pod")
    return Owner(name=name, uid=uid, service_account=pod.get("spec", {}).get("serviceAccountName") or "default")


# --- submit, wait, clean up ------------------------------------------------------------------------------------


def _owned_by(job: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in job.get("metadata", {}).get("ownerReferences") or [])


def _remove_stale(cluster: Cluster, obj: dict[str, Any], *, timeout_s: float, poll_s: float) -> None:
    """Delete the TrainJobs of earlier attempts of this run (a task killed before its cleanup leaves one running,
    writing the same checkpoint folder) and wait until they are gone."""
    run = obj["metadata"]["labels"].get(RUN_ID_LABEL)
    if not run:
        return
    name = obj["metadata"]["name"]
    stale = [j["metadata"]["name"] for j in cluster.list(f"{RUN_ID_LABEL}={run}") if j["metadata"]["name"] != name]
    for other in stale:
        log.warning("deleting TrainJob %s, left by an earlier attempt of this run", other)
        cluster.delete(other, propagation="Foreground")
    deadline = time.monotonic() + timeout_s
    while stale:
        stale = [other for other in stale if cluster.get(other) is not None]
        if stale and time.monotonic() > deadline:
            raise TrainJobFailed(
                f"TrainJob {', '.join(stale)} of an earlier attempt of this run is still there {timeout_s:.0f} s "
                "after it was deleted; a new TrainJob would write the same checkpoints, so this attempt stops"
            )
        if stale:
            time.sleep(poll_s)


def submit(
    cluster: Cluster, obj: dict[str, Any], *, stale_timeout_s: float = STALE_TIMEOUT_S, poll_s: float = POLL_S
) -> dict[str, Any]:
    """Create the TrainJob ``obj``; an existing one of the same name and owner (this attempt's) is adopted."""
    name = obj["metadata"]["name"]
    _remove_stale(cluster, obj, timeout_s=stale_timeout_s, poll_s=poll_s)
    try:
        created = cluster.create(obj)
        log.info("submitted TrainJob %s/%s: %d nodes", cluster.namespace, name, obj["spec"]["trainer"]["numNodes"])
        return created
    except _AlreadyExists:
        pass
    existing = cluster.get(name)
    if existing is None:  # deleted in between: create it after all
        return cluster.create(obj)
    owners = [ref.get("uid") for ref in obj["metadata"].get("ownerReferences") or []]
    if owners and not _owned_by(existing, owners[0]):
        raise TrainJobFailed(
            f"TrainJob {cluster.namespace}/{name} exists and belongs to another pod; delete it "
            f"(kubectl -n {cluster.namespace} delete trainjob {name}) and retry the run"
        )
    log.info("TrainJob %s already exists for this attempt (created %s): adopting it", name, _created(existing))
    return existing


def _created(job: dict[str, Any]) -> str:
    return str(job.get("metadata", {}).get("creationTimestamp") or "?")


def _epoch(value: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO 8601 / RFC 3339 time (naive: UTC)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.strip():
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    return None


def terminal(job: dict[str, Any]) -> dict[str, Any] | None:
    """The TrainJob's ``Complete`` or ``Failed`` condition when it is True, else None."""
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("type") in (COMPLETE, FAILED) and cond.get("status") == "True":
            return cond
    return None


def _pods_line(pods: list[dict[str, Any]]) -> str:
    phases: dict[str, int] = {}
    unschedulable = ""
    for pod in pods:
        phase = pod.get("status", {}).get("phase") or "Unknown"
        phases[phase] = phases.get(phase, 0) + 1
        for cond in pod.get("status", {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
                unschedulable = f"; unschedulable: {cond.get('message', '')}"
    return ", ".join(f"{n} {phase}" for phase, n in sorted(phases.items())) + unschedulable


def describe(job: dict[str, Any], pods: list[dict[str, Any]]) -> str:
    """One line: the TrainJob's true conditions (with reasons), its progress if reported, its pods by phase."""
    status = job.get("status", {})
    conds = [
        f"{c.get('type')}" + (f" ({c.get('reason')})" if c.get("reason") else "")
        for c in status.get("conditions") or []
        if c.get("status") == "True"
    ]
    parts = [", ".join(conds) or "no conditions yet"]
    progress = (status.get("trainerStatus") or {}).get("progressPercentage")
    if progress is not None:
        parts.append(f"{progress}% done")
    parts.append(f"pods: {_pods_line(pods) or 'none yet'}")
    return "; ".join(parts)


class LogFollower:
    """Copies the rank-0 pod's log lines into ``emit`` from a daemon thread while the TrainJob runs.

    Rank 0 is the pod of the node job with completion index 0; when the JobSet replaces it (a restart), the new
    pod is followed. A stream that breaks while the pod still runs is reopened, skipping the lines already shown.
    """

    def __init__(self, cluster: Cluster, job: str, emit: Callable[[str], None], poll_s: float):
        self.cluster, self.emit, self.poll_s = cluster, emit, poll_s
        self.selector = f"{JOBSET_NAME_LABEL}={job},{REPLICATED_JOB_LABEL}={NODE},{JOB_INDEX_LABEL}=0"
        self._stop = threading.Event()  # the TrainJob ended (or the wait did): one last pass, then return
        self._abort = threading.Event()  # return now
        self._resp: Any = None
        self._shown: dict[str, int] = {}  # pod uid -> lines shown
        self._thread = threading.Thread(target=self._run, name=f"log-{job}", daemon=True)

    def start(self) -> LogFollower:
        self._thread.start()
        return self

    def stop(self, drain_s: float = 10.0) -> None:
        """Let the current stream finish (the pod has ended, its log is ending) for up to ``drain_s``, then cut it."""
        self._stop.set()
        self._thread.join(drain_s)
        if self._thread.is_alive():
            self._abort.set()
            _cut(self._resp)
            self._thread.join(1.0)

    def _rank0(self) -> dict[str, Any] | None:
        pods = [p for p in self.cluster.pods(self.selector) if p.get("status", {}).get("phase") != "Pending"]
        return max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", default=None)

    def _run(self) -> None:
        done: set[str] = set()  # pods whose whole log was shown
        while not self._abort.is_set():
            stopping = self._stop.is_set()
            try:
                pod = self._rank0()
                if pod is not None and pod["metadata"]["uid"] not in done:
                    ended = pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
                    self._stream(pod)
                    if ended or self._stop.is_set():
                        done.add(pod["metadata"]["uid"])
            except Exception as err:  # the log is a convenience: never let it break the wait
                log.debug("following rank 0's log: %s", err)
            if stopping:  # that was the last pass, after the TrainJob ended
                return
            self._stop.wait(self.poll_s)

    def _stream(self, pod: dict[str, Any]) -> None:
        """Show the pod's log lines past those shown already, until its stream ends."""
        from kubernetes.watch.watch import iter_resp_lines

        uid = pod["metadata"]["uid"]
        resp = self._resp = self.cluster.follow(pod["metadata"]["name"])
        count = 0
        try:
            for line in iter_resp_lines(resp):
                if self._abort.is_set():
                    return
                count += 1
                if count > self._shown.get(uid, 0):
                    self.emit(f"[{NODE}-0] {line}")
                    self._shown[uid] = count
        finally:
            self._resp = None
            resp.close()


def _cut(resp: Any) -> None:
    """Unblock the thread reading ``resp`` by shutting its socket down (closing the response from another thread
    would wait for that thread's read to end)."""
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _failed_pods(pods: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(finish time, pod, its trainer container's terminated state) of the pods whose trainer exited non-zero,
    first failure first (the others usually fail because it did)."""
    out = []
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            if cs.get("name") != NODE:
                continue
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                term = state.get("terminated")
                if term and term.get("exitCode", 0) != 0:
                    out.append((str(term.get("finishedAt") or ""), pod, term))
                    break
    return sorted(out, key=lambda item: item[0])


def _disrupted(pod: dict[str, Any]) -> str | None:
    """Why the pod was taken away (a node drain, an eviction, a preemption), or None."""
    status = pod.get("status", {})
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return f"{cond.get('reason') or 'DisruptionTarget'}: {cond.get('message') or ''}".rstrip(": ")
    if status.get("reason") in _DISRUPTION_REASONS:
        return f"{status['reason']}: {status.get('message') or ''}".rstrip(": ")
    return None


def preemption_marker(checkpoint_dir: str | Path, since: float) -> dict[str, Any] | None:
    """Rank 0's ``kubetune-preempted.json`` if it was written after ``since`` (epoch seconds; its ``time``, else
    the file's modification time), else None."""
    path = Path(checkpoint_dir) / PREEMPTED_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        mtime = path.stat().st_mtime
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    when = _epoch(data.get("time"))
    return data if (mtime if when is None else when) > since else None


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.rstrip("\n").splitlines()) or "    (empty)"


def outcome_error(
    cluster: Cluster, job: dict[str, Any], cond: dict[str, Any], *, checkpoint_dir: str, submitted: float
) -> Exception:
    """What a ``Failed`` TrainJob means: :class:`TrainJobPreempted` or :class:`TrainJobFailed` (see the module
    docstring)."""
    name = job["metadata"]["name"]
    marker = preemption_marker(checkpoint_dir, submitted)
    if marker is not None:
        step, ckpt = marker.get("step"), marker.get("checkpoint")
        return TrainJobPreempted(
            f"TrainJob {name} was preempted at step {step} (world size {marker.get('world_size')}), checkpoint "
            f"{ckpt}; the retry resumes from it",
            step=step if isinstance(step, int) else None,
            checkpoint=ckpt,
        )
    pods = cluster.pods(f"{JOBSET_NAME_LABEL}={name}")
    for pod in pods:
        why = _disrupted(pod)
        if why:
            return TrainJobPreempted(
                f"TrainJob {name}: pod {pod['metadata']['name']} was taken off its node ({why}); the retry "
                f"resumes from the newest sealed checkpoint in {checkpoint_dir}"
            )
    what = f"TrainJob {name} failed ({cond.get('reason') or 'no reason'}: {cond.get('message') or 'no message'})"
    failed = _failed_pods(pods)
    if not failed:
        return TrainJobFailed(f"{what}; no pod of it exited with an error (pods: {_pods_line(pods) or 'none'})")
    _, pod, term = failed[0]
    pod_name = pod["metadata"]["name"]
    index = pod["metadata"].get("labels", {}).get(JOB_INDEX_LABEL, "?")
    try:
        tail = cluster.log(pod_name, LOG_TAIL_LINES)
    except KubernetesError as err:
        tail = f"(its log could not be read: {err})"
    return TrainJobFailed(
        f"{what}: pod {pod_name} (node {index}) exited with code {term.get('exitCode')} "
        f"({term.get('reason') or 'Error'}); its last lines:\n{_indent(tail)}"
    )


def wait(
    cluster: Cluster,
    name: str,
    *,
    timeout_s: float,
    poll_s: float = POLL_S,
    emit: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Poll the TrainJob until it is ``Complete`` or ``Failed``: ``(job, condition)``. Streams rank 0's log into
    ``emit`` (default: stdout, the task's log) and logs each change of its status. TrainJobFailed if it vanishes
    or does not end within ``timeout_s``."""
    follower = LogFollower(cluster, name, emit or _print, poll_s).start()
    deadline = time.monotonic() + timeout_s
    last = None
    drain_s = 0.0  # cut the log stream at once, unless the TrainJob ended (its pods' logs are ending)
    try:
        while True:
            job = cluster.get(name)
            if job is None:
                raise TrainJobFailed(f"TrainJob {cluster.namespace}/{name} was deleted while the train task waited")
            line = describe(job, cluster.pods(f"{JOBSET_NAME_LABEL}={name}"))
            if line != last:
                log.info("TrainJob %s: %s", name, line)
                last = line
            cond = terminal(job)
            if cond is not None:
                drain_s = 10.0
                return job, cond
            if time.monotonic() > deadline:
                raise TrainJobFailed(f"TrainJob {name} did not finish within {timeout_s:.0f} s; the task gave up")
            time.sleep(poll_s)
    finally:
        follower.stop(drain_s)


def _print(line: str) -> None:
    print(line, flush=True)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Inside: SIGTERM raises :class:`_Terminated` in the main thread (elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough; the cleanup must not be cut short
        raise _Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _clean_up(cluster: Cluster, obj: dict[str, Any]) -> None:
    """Delete this attempt's TrainJob if it is there and this task's pod owns it (never another pod's)."""
    name = obj["metadata"]["name"]
    owners = [ref.get("uid") for ref in obj["metadata"].get("ownerReferences") or []]
    try:
        job = cluster.get(name)
        if job is None or (owners and not _owned_by(job, owners[0])):
            return
        if cluster.delete(name):
            log.info("deleted TrainJob %s", name)
    except KubernetesError as err:  # the owner reference still removes it with the task's pod
        log.warning("could not delete TrainJob %s: %s", name, err)


def run(
    cluster: Cluster,
    obj: dict[str, Any],
    *,
    checkpoint_dir: str,
    timeout_s: float,
    poll_s: float = POLL_S,
    stale_timeout_s: float = STALE_TIMEOUT_S,
    emit: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Submit ``obj``, wait for it, delete it (always, SIGTERM included); the finished job if it is Complete, else
    the error :func:`outcome_error` names (SIGTERM: :class:`TrainJobPreempted`)."""
    name = obj["metadata"]["name"]
    asked = time.time()
    terminated = False
    with _sigterm_raises():
        try:
            job = submit(cluster, obj, stale_timeout_s=stale_timeout_s, poll_s=poll_s)
            job, cond = wait(cluster, name, timeout_s=timeout_s, poll_s=poll_s, emit=emit)
            if cond["type"] != COMPLETE:
                submitted = _epoch(job["metadata"].get("creationTimestamp")) or asked
                raise outcome_error(cluster, job, cond, checkpoint_dir=checkpoint_dir, submitted=submitted)
            log.info("TrainJob %s completed", name)
            return job
        except _Terminated:
            terminated = True
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _clean_up(cluster, obj)
    assert terminated
    raise TrainJobPreempted(
        f"the train task was stopped (SIGTERM) while TrainJob {name} ran; deleted it (its nodes save a checkpoint "
        f"as they stop); the retry resumes from the newest sealed checkpoint in {checkpoint_dir}"
    )


def train_on_nodes(
    cfg: Any,
    packed: str | Path,
    out: str | Path,
    *,
    nodes: int,
    pool: str,
    image: str,
    checkpoint_pvc: str,
    checkpoint_gcsfuse: bool,
    run_id: str,
    api_client: Any = None,
    environ: Mapping[str, str] | None = None,
    mount: str = placement.CHECKPOINT_MOUNT,
    poll_s: float = POLL_S,
    emit: Callable[[str], None] | None = None,
    cluster_options: Mapping[str, Any] | None = None,
) -> Path:
    """Train on a TrainJob of ``nodes`` nodes and put the adapter into ``out`` (see the module docstring)."""
    checkpoint_dir = cfg.train.checkpoint_dir
    nodes = check(
        nodes, pool=pool, image=image, checkpoint_pvc=checkpoint_pvc, checkpoint_dir=checkpoint_dir, mount=mount
    )
    environ = os.environ if environ is None else environ
    work = Path(checkpoint_dir) / WORK_FOLDER
    stage_inputs(cfg, packed, work)
    cluster = Cluster.connect(api_client, environ=environ, **dict(cluster_options or {}))
    owner = own_pod(cluster, environ)
    obj = build(
        nodes,
        pool,
        name=job_name(run_id, owner.attempt),
        image=image,
        checkpoint_pvc=checkpoint_pvc,
        work_dir=str(work),
        checkpoint_gcsfuse=checkpoint_gcsfuse,
        namespace=cluster.namespace,
        owner=owner,
        run_id=run_id,
        mount=mount,
    )
    run(cluster, obj, checkpoint_dir=checkpoint_dir, timeout_s=DEADLINE_S + WAIT_MARGIN_S, poll_s=poll_s, emit=emit)
    return collect(work, out, obj["metadata"]["name"])


def train(cfg: Any, packed: str | Path, out: str | Path, *, nodes: int, **on_nodes: Any) -> Path:
    """The train task's work: one node trains here (``kubetune.train.train``, as a single-node run always has; the
    keywords ``on_nodes`` are then unused); more submit a TrainJob (:func:`train_on_nodes`, which takes them).
    Returns the adapter folder ``out``."""
    if check_nodes(nodes) == 1:
        from kubetune import hardware
        from kubetune.train import train as run_train

        return run_train(cfg, packed, out, hw=hardware.detect(**hardware.overrides(os.environ)))
    return train_on_nodes(cfg, packed, out, nodes=nodes, **on_nodes)
