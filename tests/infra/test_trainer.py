"""Kubeflow Trainer on the cluster: the pinned install, kubetune's ClusterTrainingRuntimes and who may create
TrainJobs. Runtimes and TrainJobs are checked against the vendored CRD schemas of Trainer v2.3.0 and the
kubeflow-trainer-api models (tests/infra/trainer_schema.py), their core-type parts against the Kubernetes schemas
(kubernetes-validate), and the rendered RBAC is evaluated for every subject.
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
import typing

import pytest
import yaml

from pipelines import placement

from . import trainer_schema
from .conftest import OVERLAYS, ROOT, kubernetes_validate, render

pytestmark = pytest.mark.infra

CTR = "ClusterTrainingRuntime"
RUNTIME_KINDS = {CTR, "TrainJob", "TrainingRuntime"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(ROOT / "manifests" / "overlays" / overlay) for overlay in OVERLAYS}


def _runtimes(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == CTR}


# --- the install ------------------------------------------------------------------------------------------------


def test_trainer_install_is_pinned_to_the_release_of_the_api_models():
    """The remote base cannot be fetched here, so it is not rendered: its pin and path are checked."""
    models = importlib.metadata.version("kubeflow-trainer-api")
    (resource,) = yaml.safe_load((ROOT / "manifests" / "trainer" / "kustomization.yaml").read_text())["resources"]
    base, _, ref = resource.partition("?ref=")
    assert base == "github.com/kubeflow/trainer/manifests/overlays/manager", base
    assert ref == f"v{models}", f"Trainer install {ref} vs kubeflow-trainer-api {models}"
    assert trainer_schema.SCHEMA_DIR.name == f"trainer-v{models}"


def test_the_controller_install_is_not_part_of_the_overlays(rendered):
    """The overlays ship the runtimes, never the CRDs or the controller (`make trainer-install` does)."""
    for objects in rendered.values():
        assert not [o for o in objects if o["kind"] == "CustomResourceDefinition"]
        assert not [o for o in objects if o["metadata"].get("namespace") == "kubeflow-system"]


@pytest.mark.skip(reason="manifests/trainer is a remote kustomize base on GitHub, which this machine cannot reach")
def test_trainer_install_renders():  # pragma: no cover - documents the offline limit
    render(ROOT / "manifests" / "trainer")


# --- the runtimes -----------------------------------------------------------------------------------------------


def test_every_overlay_ships_one_runtime_per_pool_named_as_the_pipeline_expects(rendered):
    for overlay, objects in rendered.items():
        assert set(_runtimes(objects)) == set(placement.TRAINING_RUNTIMES.values()), overlay
        assert not [o for o in objects if o["kind"] in RUNTIME_KINDS - {CTR}], "only cluster runtimes ship"


def test_runtimes_validate_against_the_trainer_schema_and_models(rendered):
    for overlay, objects in rendered.items():
        for name, runtime in _runtimes(objects).items():
            assert trainer_schema.validate(CTR, runtime) == [], f"{overlay}: {name}"


def test_runtimes_core_parts_validate_against_the_kubernetes_schemas(rendered, tmp_path):
    core = [
        part
        for objects in rendered.values()
        for runtime in _runtimes(objects).values()
        for part in trainer_schema.core_objects(CTR, runtime)
    ]
    assert {o["kind"] for o in core} == {"Job"} and len(core) == 2 * len(rendered)
    assert kubernetes_validate(core, tmp_path) == []


def _node_job(runtime: dict) -> dict:
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return job


def test_runtimes_are_torch_with_one_node_job_and_container_named_as_trainers_own(rendered):
    for runtime in _runtimes(rendered["dev"]).values():
        assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}
        job = _node_job(runtime)
        assert job["name"] == placement.TRAINJOB_CONTAINER
        assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
        pod = job["template"]["spec"]["template"]["spec"]
        assert [c["name"] for c in pod["containers"]] == [placement.TRAINJOB_CONTAINER]
        # A failed pod fails the TrainJob at once; the KFP task's retry resumes from the checkpoint.
        assert job["template"]["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"


def _env(runtime: dict) -> dict[str, dict]:
    container = _node_job(runtime)["template"]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container["env"]}


def test_cpu_runtime_binds_gloo_to_the_pod_interface_and_sizes_openmp_from_the_cpu_limit(rendered):
    env = _env(_runtimes(rendered["dev"])[placement.TRAINING_RUNTIMES["cpu"]])
    assert env["GLOO_SOCKET_IFNAME"]["value"] == env["TP_SOCKET_IFNAME"]["value"] == "eth0"
    threads = env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert threads == {"containerName": placement.TRAINJOB_CONTAINER, "resource": "limits.cpu", "divisor": "1"}
    assert not {k for k in env if k.startswith("NCCL_")}


def test_gpu_runtime_uses_nccl_on_the_pod_interface(rendered):
    env = _env(_runtimes(rendered["dev"])[placement.TRAINING_RUNTIMES["gpu"]])
    assert env["NCCL_SOCKET_IFNAME"]["value"] == env["GLOO_SOCKET_IFNAME"]["value"] == "eth0"
    assert env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"


def test_runtime_pods_are_hardened_like_every_kubetune_workload(rendered):
    for runtime in _runtimes(rendered["dev"]).values():
        pod = _node_job(runtime)["template"]["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = pod["containers"]
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        # Read-only root: the images' caches live under /tmp, which is a volume.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]] and volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert container["resources"]["requests"].items() <= container["resources"]["limits"].items()


# --- TrainJobs on these runtimes: the shape the pipeline's train task submits -----------------------------------


def _trainjob(pool: str, nodes: int) -> dict:
    """A TrainJob as the Trainer v2.3 API takes it: runtime by name, image/command/nodes/resources in `trainer`,
    the checkpoint volume and labels patched into the "node" job's pod template by one manager's runtime patch."""
    sizes = placement.RESOURCES[f"train-{pool}"]
    limits = {"cpu": sizes["cpu_limit"], "memory": sizes["memory_limit"]}
    if pool == "gpu":
        limits[placement.GPU_RESOURCE] = placement.GPU_COUNT
    pod_patch = {
        "metadata": {
            "labels": {placement.STAGE_LABEL_KEY: f"train-{pool}", "kubetune.io/run": "run-0001"},
            "annotations": {"gke-gcsfuse/volumes": "true"},
        },
        "spec": {
            "volumes": [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": "kubetune-checkpoints"}}],
            "containers": [
                {
                    "name": placement.TRAINJOB_CONTAINER,
                    "volumeMounts": [{"name": "checkpoints", "mountPath": "/mnt/kubetune-checkpoints"}],
                }
            ],
        },
    }
    return {
        "apiVersion": trainer_schema.API_VERSION,
        "kind": "TrainJob",
        "metadata": {"name": f"kubetune-run-0001-{pool}-{nodes}", "namespace": placement.RUN_NAMESPACE},
        "spec": {
            "runtimeRef": {"name": placement.TRAINING_RUNTIMES[pool]},
            "trainer": {
                "image": f"us-central1-docker.pkg.dev/acme-ml/kubetune/kubetune-{pool}:t1",
                "command": ["torchrun", "--no-python", "kubetune", "train", "--config", "/mnt/config.yaml"],
                "numNodes": nodes,
                "numProcPerNode": 1,
                "resourcesPerNode": {"requests": dict(limits), "limits": limits},
            },
            "runtimePatches": [
                {
                    "manager": "kubetune.io/pipeline",
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {"name": "node", "template": {"spec": {"template": pod_patch}}},
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }


@pytest.mark.parametrize("pool", sorted(placement.TRAINING_RUNTIMES))
@pytest.mark.parametrize("nodes", [1, 2, 8])
def test_a_trainjob_on_each_runtime_validates(pool, nodes, tmp_path):
    job = _trainjob(pool, nodes)
    assert trainer_schema.validate("TrainJob", job) == []
    core = trainer_schema.core_objects("TrainJob", job)
    assert [o["kind"] for o in core] == ["Pod", "Pod"]
    assert kubernetes_validate(core, tmp_path) == []


def _patched_pod(job: dict) -> dict:
    return job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"][
        "spec"
    ]["template"]


def _set(path: str, value):
    def mutate(obj):
        *parents, last = path.split(".")
        node = obj
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[last] = value

    return mutate


# (what is wrong, kind, mutation, an expected fragment of one error)
REFUSED = [
    ("a 2.2-style torch policy", CTR, _set("spec.mlPolicy.torch", {"numProcPerNode": "auto"}), "unknown field"),
    ("two ML policies", CTR, _set("spec.mlPolicy.mpi", {}), "Only one of the policy"),
    ("numNodes as a string", CTR, _set("spec.mlPolicy.numNodes", "2"), "expected integer"),
    ("an MPI implementation", CTR, _set("spec.mlPolicy.mpi", {"mpiImplementation": "Intel"}), "is not one of"),
    (
        "a duplicate job",
        CTR,
        lambda o: o["spec"]["template"]["spec"]["replicatedJobs"].append(copy.deepcopy(_node_job(o))),
        "two items with the same name",
    ),
    ("a job without template", CTR, lambda o: _node_job(o).pop("template"), "template: required"),
    ("a namespace", CTR, _set("metadata.namespace", "kubeflow"), "cluster-scoped"),
    ("a negative TTL", CTR, _set("spec.template.spec.ttlSecondsAfterFinished", -1), "minimum"),
    ("an upper-case name", "TrainJob", _set("metadata.name", "Kubetune-Run"), "RFC 1035"),
    ("a 64-character name", "TrainJob", _set("metadata.name", "k" * 64), "no more than 63"),
    ("no runtime", "TrainJob", lambda o: o["spec"].pop("runtimeRef"), "runtimeRef: required"),
    ("another manager", "TrainJob", _set("spec.managedBy", "example.com/other"), "ManagedBy must be"),
    ("a patch without manager", "TrainJob", lambda o: o["spec"]["runtimePatches"][0].pop("manager"), "required"),
    (
        "a patched image",
        "TrainJob",
        lambda o: _patched_pod(o)["spec"]["containers"][0].update(image="x"),
        "unknown field",
    ),
    ("patched resources", "TrainJob", lambda o: _patched_pod(o)["spec"].update(resources={}), "unknown field"),
    ("a zero deadline", "TrainJob", _set("spec.activeDeadlineSeconds", 0), "minimum"),
    ("an int32 overflow", "TrainJob", _set("spec.trainer.numNodes", 2**31), "int32 range"),
    ("a null", "TrainJob", _set("spec.suspend", None), "null is not allowed"),
]


@pytest.mark.parametrize("what, kind, mutate, expected", REFUSED, ids=[r[0] for r in REFUSED])
def test_the_validator_refuses(what, kind, mutate, expected, rendered):
    obj = copy.deepcopy(
        _runtimes(rendered["dev"])[placement.TRAINING_RUNTIMES["cpu"]] if kind == CTR else _trainjob("cpu", 2)
    )
    mutate(obj)
    errors = trainer_schema.validate(kind, obj)
    assert any(expected in e for e in errors), f"{what}: {errors}"


def test_the_models_are_checked_too():
    """What the schema extract cannot see (it is elided) still meets the models' types."""
    job = _trainjob("cpu", 2)
    job["spec"]["trainer"]["env"] = [{"name": "A", "value": 1}]
    assert trainer_schema.model_errors("TrainJob", job)


def test_every_cel_rule_of_the_vendored_schemas_is_evaluated():
    rules = trainer_schema.cel_rules()
    assert rules - {trainer_schema.IMMUTABLE} == set(trainer_schema.CEL)


def _fields(cls) -> dict[str, type | None]:
    """A model's fields by JSON name, each with the model class it nests (None for scalars and maps)."""
    from pydantic import BaseModel

    out = {}
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        while typing.get_origin(annotation) in (typing.Union, list, typing.List):  # noqa: UP006
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        out[field.alias or name] = nested
    return out


def _compare(node: dict, cls, path: str, differences: set[str]) -> None:
    properties = node.get("properties")
    if not properties or cls is None or cls.__module__.startswith("kubeflow_trainer_api.models.io_k8s"):
        return  # a scalar, a map, or a Kubernetes core type (elided in the extract)
    fields = _fields(cls)
    differences.update(f"{path}.{k}: only in the schema" for k in set(properties) - set(fields))
    differences.update(f"{path}.{k}: only in the models" for k in set(fields) - set(properties))
    for key in set(properties) & set(fields):
        child = properties[key]
        _compare(child.get("items", child), fields[key], f"{path}.{key}", differences)


def test_vendored_schemas_name_the_fields_of_the_installed_models():
    """The vendored CRD versions are the ones of kubeflow-trainer-api 2.3.0: the same Trainer and JobSet fields,
    but for the one difference each header records."""
    import kubeflow_trainer_api.models as models

    found = {}
    for kind, (_, cls) in trainer_schema.KINDS.items():
        differences: set[str] = set()
        _compare(trainer_schema.schema(kind), getattr(models, cls), "", differences)
        found[kind] = differences
    pod_patch = ".spec.runtimePatches.trainingRuntimeSpec.template.spec.replicatedJobs.template.spec.template.spec"
    assert found == {
        "TrainJob": {f"{pod_patch}.terminationGracePeriodSeconds: only in the models"},
        CTR: set(),
    }


# --- who may create TrainJobs -----------------------------------------------------------------------------------


def _grants(objects: list[dict]) -> list[tuple[tuple[str, str, str], str | None, dict]]:
    """(subject, namespace the grant applies in or None for cluster-wide, rule) for every binding's rules."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects}
    out = []
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        ref = binding["roleRef"]
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        role_ns = scope if ref["kind"] == "Role" else None
        role = roles.get((ref["kind"], role_ns, ref["name"]))
        assert role is not None, f"{binding['metadata']['name']} binds a role the manifests do not define: {ref}"
        for subject in binding.get("subjects", []):
            key = (subject["kind"], subject.get("namespace", scope or ""), subject["name"])
            out.extend((key, scope, rule) for rule in role.get("rules", []))
    return out


def _allows(rule: dict, group: str, resource: str, verb: str) -> bool:
    return (
        bool({group, "*"} & set(rule.get("apiGroups", [])))
        and bool({resource, "*"} & set(rule.get("resources", [])))
        and bool({verb, "*"} & set(rule.get("verbs", [])))
    )


def _trainjob_creators(objects: list[dict]) -> dict[tuple[str, str, str], set[str | None]]:
    creators: dict[tuple[str, str, str], set[str | None]] = {}
    for subject, scope, rule in _grants(objects):
        if _allows(rule, "trainer.kubeflow.org", "trainjobs", "create"):
            creators.setdefault(subject, set()).add(scope)
    return creators


PIPELINE_IDENTITIES = {
    ("ServiceAccount", placement.RUN_NAMESPACE, placement.SERVICE_ACCOUNT),
    ("ServiceAccount", placement.RUN_NAMESPACE, placement.KFP_DEFAULT_SERVICE_ACCOUNT),
}


def test_only_the_pipeline_identities_may_create_trainjobs_and_only_in_the_run_namespace(rendered):
    for overlay, objects in rendered.items():
        creators = _trainjob_creators(objects)
        assert set(creators) == PIPELINE_IDENTITIES, overlay
        assert all(scopes == {placement.RUN_NAMESPACE} for scopes in creators.values()), creators
        for role in (o for o in objects if o["kind"] == "ClusterRole"):
            for rule in role.get("rules", []):
                assert not _allows(rule, "trainer.kubeflow.org", "trainjobs", "create"), role["metadata"]["name"]


def test_the_trainjob_role_grants_exactly_what_the_train_task_uses(rendered):
    for objects in rendered.values():
        (role,) = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "kubetune-trainjobs"]
        assert role["metadata"]["namespace"] == placement.RUN_NAMESPACE
        granted = {
            (group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
        assert granted == _calls_of_the_train_task()
        assert not [r for r in role["rules"] if "resourceNames" in r]


# kubernetes client method of pipelines/trainjob.py -> (API group, resource, RBAC verb) it needs.
_CLIENT_CALLS = {
    "create_namespaced_custom_object": ("trainer.kubeflow.org", "trainjobs", "create"),
    "get_namespaced_custom_object": ("trainer.kubeflow.org", "trainjobs", "get"),
    "list_namespaced_custom_object": ("trainer.kubeflow.org", "trainjobs", "list"),
    "delete_namespaced_custom_object": ("trainer.kubeflow.org", "trainjobs", "delete"),
    "read_namespaced_pod": ("", "pods", "get"),
    "list_namespaced_pod": ("", "pods", "list"),
    "read_namespaced_pod_log": ("", "pods/log", "get"),
}


def _calls_of_the_train_task() -> set[tuple[str, str, str]]:
    """The permissions the train task's code asks for: every kubernetes client method it calls, read from
    pipelines/trainjob.py (a method this table does not know fails the test, so a new call cannot go unnoticed)."""
    source = (ROOT / "pipelines" / "trainjob.py").read_text(encoding="utf-8")
    called = set(re.findall(r"self\.(?:custom|core)\.(\w+)", source))
    assert called, "no kubernetes client calls found in pipelines/trainjob.py"
    unknown = called - set(_CLIENT_CALLS)
    assert not unknown, f"add the RBAC these calls need to _CLIENT_CALLS and manifests/base/trainer: {unknown}"
    assert not re.search(r"\bwatch=True|Watch\(\)", source), "the train task watches: grant watch"
    return {_CLIENT_CALLS[m] for m in called}


def test_the_rbac_evaluation_can_fail(rendered):
    """A ClusterRoleBinding handing another account a wildcard ClusterRole is seen as a TrainJob creator."""
    objects = copy.deepcopy(rendered["dev"])
    objects += [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "everything"},
            "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "everything"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "everything"},
            "subjects": [{"kind": "ServiceAccount", "name": "mlflow", "namespace": "kubetune"}],
        },
    ]
    creators = _trainjob_creators(objects)
    assert creators[("ServiceAccount", "kubetune", "mlflow")] == {None}


def test_the_core_part_check_can_fail(rendered, tmp_path):
    """What the schema extract elides is still seen: a typo'd field in the runtime's pod is refused by
    kubernetes-validate on the core parts, and by the models (the extract alone would let it through)."""
    runtime = copy.deepcopy(_runtimes(rendered["dev"])[placement.TRAINING_RUNTIMES["gpu"]])
    _node_job(runtime)["template"]["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    schema_only: list[str] = []
    trainer_schema._check(trainer_schema.schema(CTR), runtime, "", schema_only)
    assert schema_only == []
    assert [
        e
        for e in trainer_schema.validate(CTR, runtime)
        if e.endswith("containers[].resource: unknown to the kubeflow-trainer-api ClusterTrainingRuntime model")
    ]
    (error,) = kubernetes_validate(trainer_schema.core_objects(CTR, runtime), tmp_path)
    assert "'resource' was unexpected" in error


# --- the TrainJobs the pipeline's train task builds (pipelines.trainjob.build) ----------------------------------


def _built(pool: str, nodes: int, *, gcsfuse: bool) -> dict:
    from pipelines import trainjob

    owner = trainjob.Owner(
        name="kubetune-sft-abc12-train-cpu-1234",
        uid="0a1b2c3d-0000-4000-8000-000000000001",
        service_account=placement.KFP_DEFAULT_SERVICE_ACCOUNT,
    )
    return trainjob.build(
        nodes,
        pool,
        name=trainjob.job_name("run-7f3e9c", owner.attempt),
        image=f"us-central1-docker.pkg.dev/acme-ml/kubetune/kubetune-{pool}:t1",
        checkpoint_pvc="kubetune-checkpoints",
        checkpoint_gcsfuse=gcsfuse,
        work_dir=f"{placement.CHECKPOINT_MOUNT}/run-7f3e9c/trainjob",
        owner=owner,
        run_id="run-7f3e9c",
    )


@pytest.mark.parametrize("gcsfuse", [False, True])
@pytest.mark.parametrize("pool", sorted(placement.TRAINING_RUNTIMES))
@pytest.mark.parametrize("nodes", [1, 2, 8])
def test_the_pipelines_trainjob_validates_against_the_release_schema(pool, nodes, gcsfuse, tmp_path):
    job = _built(pool, nodes, gcsfuse=gcsfuse)
    assert trainer_schema.validate("TrainJob", job) == []
    assert kubernetes_validate(trainer_schema.core_objects("TrainJob", job), tmp_path) == []
    assert job["spec"]["trainer"]["numNodes"] == nodes
    assert job["spec"]["runtimeRef"]["name"] == placement.TRAINING_RUNTIMES[pool]


def test_the_pipelines_trainjob_runs_on_a_runtime_the_overlays_ship(rendered):
    for objects in rendered.values():
        shipped = _runtimes(objects)
        for pool in placement.TRAINING_RUNTIMES:
            job = _built(pool, 2, gcsfuse=True)
            runtime = shipped[job["spec"]["runtimeRef"]["name"]]
            assert runtime["metadata"]["labels"][placement.POOL_LABEL_KEY] == placement.POOLS[pool]["label_value"]
