"""Offline validation of Kubeflow Trainer v2.3.0 objects: TrainJob and ClusterTrainingRuntime.

No cluster is needed. Three sources agree on what the API server of the pinned release would accept:

- :func:`validate` checks an object against the vendored CRD schema extract of the release
  (``schemas/trainer-v2.3.0/``, where it came from is in each file's header): structure, types and formats, enums,
  required fields, limits, list keys, fields the schema does not know (``kubectl apply`` validates fields strictly
  and refuses those) and the CRD's CEL rules, evaluated here in Python (:data:`CEL`; an immutability rule
  ``self == oldSelf`` holds for any new object). It also loads the object into the kubeflow-trainer-api 2.3.0
  models and reports what they refuse or do not know.
- :func:`core_objects` returns the Kubernetes core-type parts the extract elides (a runtime's Job templates, a
  TrainJob's trainer container and pod patches) as standalone objects, for kubernetes-validate, which lives in
  ``.venv-infra`` (tests/infra/test_trainer.py runs it there).

``validate(kind, obj)`` returns a list of one-line errors, empty when the object is valid.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import yaml

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas" / "trainer-v2.3.0"
API_VERSION = "trainer.kubeflow.org/v1alpha1"
# kind -> (CRD name, kubeflow_trainer_api model class)
KINDS: dict[str, tuple[str, str]] = {
    "TrainJob": ("trainjobs.trainer.kubeflow.org", "TrainerV1alpha1TrainJob"),
    "ClusterTrainingRuntime": ("clustertrainingruntimes.trainer.kubeflow.org", "TrainerV1alpha1ClusterTrainingRuntime"),
}
IMMUTABLE = "self == oldSelf"

_RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _one_policy(policy: dict) -> bool:
    return sum(key in policy for key in ("torch", "mpi", "jax", "xgboost", "flux")) <= 1


def _no_template_namespace(claim_policy: dict) -> bool:
    return all(not (t.get("metadata") or {}).get("namespace") for t in claim_policy.get("templates", []))


def _startup_or_depends_on(spec: dict) -> bool:
    in_order = (spec.get("startupPolicy") or {}).get("startupPolicyOrder") == "InOrder"
    return not (in_order and any("dependsOn" in job for job in spec.get("replicatedJobs", [])))


# The CRD rules of the vendored schemas other than immutability, as Python predicates over the field's value
# (CEL's ``self``). A rule not listed here is reported, never skipped.
CEL: dict[str, Callable[[Any], bool]] = {
    "self in ['trainer.kubeflow.org/trainjob-controller', 'kueue.x-k8s.io/multikueue']": lambda v: (
        v in ("trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue")
    ),
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')": lambda v: bool(
        _RFC1035.match(str((v.get("metadata") or {}).get("name", "")))
    ),
    "size(self.metadata.name) <= 63": lambda v: len(str((v.get("metadata") or {}).get("name", ""))) <= 63,
    "[has(self.torch), has(self.mpi), has(self.jax), has(self.xgboost),has(self.flux)].filter(x, x).size() <= 1": (
        _one_policy
    ),
    "self >= 1": lambda v: v >= 1,
    "self.templates.all(t, !has(t.metadata.namespace) || size(t.metadata.namespace) == 0)": _no_template_namespace,
    "!(has(self.startupPolicy) && self.startupPolicy.startupPolicyOrder == 'InOrder' && "
    "self.replicatedJobs.exists(x, has(x.dependsOn)))": _startup_or_depends_on,
}

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}
_INT_RANGE = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


@cache
def schema(kind: str) -> dict:
    """The vendored openAPIV3Schema extract of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"no vendored schema for kind {kind!r}; known: {', '.join(KINDS)}")
    return yaml.safe_load((SCHEMA_DIR / f"{KINDS[kind][0]}.yaml").read_text())


def cel_rules(node: dict | None = None) -> set[str]:
    """Every CEL rule in the vendored schemas (or under ``node``)."""
    nodes = [node] if node is not None else [schema(k) for k in KINDS]
    rules: set[str] = set()
    while nodes:
        current = nodes.pop()
        if isinstance(current, dict):
            rules.update(v["rule"] for v in current.get("x-kubernetes-validations", []))
            nodes.extend(current.values())
        elif isinstance(current, list):
            nodes.extend(current)
    return rules


def _check(node: dict, value: Any, path: str, errors: list[str]) -> None:
    where = path or "<root>"
    if value is None:
        errors.append(f"{where}: null is not allowed (leave the field out)")
        return
    expected = node.get("type")
    if expected and not _TYPES[expected](value):
        errors.append(f"{where}: expected {expected}, got {type(value).__name__} {value!r:.60}")
        return
    if "enum" in node and value not in node["enum"]:
        errors.append(f"{where}: {value!r} is not one of {node['enum']}")
    if isinstance(value, str):
        _check_string(node, value, where, errors)
    elif expected in ("integer", "number"):
        _check_number(node, value, where, errors)
    elif isinstance(value, dict):
        _check_object(node, value, path, errors)
    elif isinstance(value, list):
        _check_array(node, value, path, errors)
    for validation in node.get("x-kubernetes-validations", []):
        rule = validation["rule"]
        if rule == IMMUTABLE:
            continue
        if rule not in CEL:
            errors.append(f"{where}: CEL rule not supported by trainer_schema.CEL: {rule}")
        elif not CEL[rule](value):
            errors.append(f"{where}: {validation['message']}")


def _check_string(node: dict, value: str, where: str, errors: list[str]) -> None:
    if "maxLength" in node and len(value) > node["maxLength"]:
        errors.append(f"{where}: longer than {node['maxLength']} characters")
    if "minLength" in node and len(value) < node["minLength"]:
        errors.append(f"{where}: shorter than {node['minLength']} characters")
    if "pattern" in node and not re.search(node["pattern"], value):
        errors.append(f"{where}: {value!r} does not match {node['pattern']}")
    if node.get("format") == "date-time":
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            errors.append(f"{where}: {value!r} is not an RFC 3339 date-time")


def _check_number(node: dict, value: float, where: str, errors: list[str]) -> None:
    low, high = _INT_RANGE.get(node.get("format", ""), (None, None))
    if low is not None and not low <= value <= high:
        errors.append(f"{where}: {value} is out of the {node['format']} range")
    if "minimum" in node and value < node["minimum"]:
        errors.append(f"{where}: {value} is less than the minimum {node['minimum']}")
    if "maximum" in node and value > node["maximum"]:
        errors.append(f"{where}: {value} is more than the maximum {node['maximum']}")


def _check_object(node: dict, value: dict, path: str, errors: list[str]) -> None:
    properties = node.get("properties", {})
    for key in node.get("required", []):
        if key not in value:
            errors.append(f"{path}.{key}: required")
    if "minProperties" in node and len(value) < node["minProperties"]:
        errors.append(f"{path or '<root>'}: needs at least {node['minProperties']} field(s)")
    for key, item in value.items():
        if not path and key == "metadata":
            continue  # the object's ObjectMeta: the API server's own, checked by _metadata_errors
        if key in properties:
            _check(properties[key], item, f"{path}.{key}", errors)
        elif isinstance(node.get("additionalProperties"), dict):
            _check(node["additionalProperties"], item, f"{path}.{key}", errors)
        elif not node.get("x-kubernetes-preserve-unknown-fields"):
            errors.append(f"{path}.{key}: unknown field (not in the Trainer v2.3.0 schema)")


def _check_array(node: dict, value: list, path: str, errors: list[str]) -> None:
    if "maxItems" in node and len(value) > node["maxItems"]:
        errors.append(f"{path}: more than {node['maxItems']} items")
    if "minItems" in node and len(value) < node["minItems"]:
        errors.append(f"{path}: fewer than {node['minItems']} items")
    list_type = node.get("x-kubernetes-list-type")
    if list_type == "map":
        keys = node["x-kubernetes-list-map-keys"]
        seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
        for duplicate in {k for k in seen if seen.count(k) > 1}:
            errors.append(f"{path}: two items with the same {'/'.join(keys)} {duplicate}")
    elif list_type == "set" and len({repr(v) for v in value}) < len(value):
        errors.append(f"{path}: items of a set must be unique")
    for index, item in enumerate(value):
        _check(node.get("items", {}), item, f"{path}[{index}]", errors)


def _key_paths(value: Any, prefix: str = "") -> set[str]:
    """Every field path of a JSON value (list indices collapsed), to compare what two dicts name."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            paths.add(f"{prefix}.{key}")
            paths |= _key_paths(item, f"{prefix}.{key}")
    elif isinstance(value, list):
        for item in value:
            paths |= _key_paths(item, f"{prefix}[]")
    return paths


def model_errors(kind: str, obj: dict) -> list[str]:
    """What the kubeflow-trainer-api 2.3.0 model of ``kind`` refuses in ``obj``, or drops as unknown."""
    import kubeflow_trainer_api.models as models
    from pydantic import ValidationError

    cls = getattr(models, KINDS[kind][1])
    try:
        loaded = cls.from_dict(copy.deepcopy(obj))
    except (ValidationError, ValueError, TypeError) as e:
        return [f"{kind} model: {line}" for line in str(e).splitlines() if line.strip()][:20]
    dropped = _key_paths(obj) - _key_paths(loaded.to_dict())
    return [f"{path}: unknown to the kubeflow-trainer-api {kind} model" for path in sorted(dropped)]


_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _metadata_errors(kind: str, metadata: Any) -> list[str]:
    """The parts of ObjectMeta a manifest sets: a DNS-1123 name, string labels and annotations, and a namespace
    only on the namespaced kind (ClusterTrainingRuntime is cluster-scoped)."""
    if not isinstance(metadata, dict):
        return [".metadata: expected object"]
    errors = []
    name = metadata.get("name")
    if not name:
        errors.append(".metadata.name: required")
    elif not (isinstance(name, str) and len(name) <= 253 and _DNS1123_SUBDOMAIN.match(name)):
        errors.append(f".metadata.name: {name!r} is not a DNS-1123 subdomain")
    for field in ("labels", "annotations"):
        entries = metadata.get(field, {})
        if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
            errors.append(f".metadata.{field}: expected a map of strings")
    if kind == "ClusterTrainingRuntime" and "namespace" in metadata:
        errors.append(".metadata.namespace: ClusterTrainingRuntime is cluster-scoped")
    return errors


def validate(kind: str, obj: dict) -> list[str]:
    """One line per problem of ``obj`` as a ``kind`` (TrainJob or ClusterTrainingRuntime) of Trainer v2.3.0:
    against the vendored CRD schema extract with its CEL rules, then the kubeflow-trainer-api models."""
    errors: list[str] = []
    if obj.get("apiVersion") != API_VERSION:
        errors.append(f".apiVersion: expected {API_VERSION}, got {obj.get('apiVersion')!r}")
    if obj.get("kind") != kind:
        errors.append(f".kind: expected {kind}, got {obj.get('kind')!r}")
    errors.extend(_metadata_errors(kind, obj.get("metadata")))
    _check(schema(kind), obj, "", errors)
    if not errors:
        errors.extend(model_errors(kind, obj))
    return errors


def _pod(name: str, spec: dict, metadata: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {**(metadata or {}), "name": name}, "spec": spec}


def _patched_containers(patches: list[dict]) -> list[dict]:
    keep = ("name", "env", "securityContext", "volumeMounts")
    return [{k: c[k] for k in keep if k in c} for c in patches]


def core_objects(kind: str, obj: dict) -> list[dict]:
    """The Kubernetes core-type parts of ``obj`` that the schema extract elides, as standalone objects:
    each replicated job of a runtime as a batch/v1 Job (its pod template included) and each volume claim template
    as a PersistentVolumeClaim; a TrainJob's trainer container, initializer env and pod patches as Pods."""
    name = obj["metadata"]["name"]
    spec = obj.get("spec", {})
    out: list[dict] = []
    if kind == "ClusterTrainingRuntime":
        jobset = spec.get("template", {}).get("spec", {})
        for job in jobset.get("replicatedJobs", []):
            template = job.get("template", {})
            out.append(
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "metadata": {**template.get("metadata", {}), "name": f"{name}-{job['name']}"},
                    "spec": template.get("spec", {}),
                }
            )
        for policy in jobset.get("volumeClaimPolicies", []):
            for claim in policy.get("templates", []):
                out.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", **claim})
        return out
    if kind != "TrainJob":
        raise ValueError(f"no core objects for kind {kind!r}")
    trainer = spec.get("trainer", {})
    container = {"name": "node", "image": trainer.get("image", "image")}
    container.update({k: trainer[k] for k in ("command", "args", "env") if k in trainer})
    if "resourcesPerNode" in trainer:
        container["resources"] = trainer["resourcesPerNode"]
    out.append(_pod(f"{name}-trainer", {"containers": [container]}))
    for step, init in spec.get("initializer", {}).items():
        out.append(_pod(f"{name}-{step}", {"containers": [{"name": step, "env": init.get("env", [])}]}))
    for patch in spec.get("runtimePatches", []):
        jobs = patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", [])
        for job in jobs:
            pod = job.get("template", {}).get("spec", {}).get("template", {})
            pod_spec = dict(pod.get("spec", {}))
            pod_spec["containers"] = _patched_containers(pod_spec.get("containers", []))
            if "initContainers" in pod_spec:
                pod_spec["initContainers"] = _patched_containers(pod_spec["initContainers"])
            out.append(_pod(f"{name}-{job['name']}", pod_spec, pod.get("metadata")))
    return out
