"""The pipeline and the infrastructure agree: what the compiled pipeline expects of the cluster is what the
manifests, `make` and Terraform provide. Every test reads both sides, so neither can drift alone.

The pipeline side is the YAML that `make compile` produces (the command `make -n compile` prints, run as printed)
and the constants in pipelines/; the other side is the rendered overlays, what `make secrets` creates (run with
fake `kubectl`, `terraform` and `openssl`), what `make images` builds, and Terraform's parse tree.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from pipelines import placement
from pipelines.cli import DEFAULT_SERVICE_ACCOUNT
from pipelines.images import CPU_IMAGE_NAME, GPU_IMAGE_NAME
from pipelines.sft_pipeline import (
    CHECKPOINT_MOUNT,
    GCSFUSE_ANNOTATION,
    HF_SECRET,
    MLFLOW_SECRET,
    SETTINGS_CONFIGMAP,
)

from .conftest import OVERLAYS, ROOT, fake_bin, find, make, render, tf_blocks, tf_resources

pytestmark = pytest.mark.infra

REG = "us-central1-docker.pkg.dev/acme-ml/kubetune"
TAG = "t1"
GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"
TRAIN_TASKS = ("train-cpu", "train-gpu")


def _printed_command(make_n_output: str, needle: str) -> str:
    """The one command of `make -n` output that contains ``needle`` (continuation lines joined)."""
    lines = [line for line in make_n_output.replace("\\\n", " ").splitlines() if needle in line]
    assert len(lines) == 1, f"expected one command with {needle!r} in:\n{make_n_output}"
    return lines[0].strip()


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(ROOT / "manifests" / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def make_compile(tmp_path_factory) -> dict:
    """The pipeline as `make compile` compiles it: its arguments and the compiled spec."""
    out = tmp_path_factory.mktemp("make-compile") / "sft_pipeline.yaml"
    result = make("-n", "compile", "PROJECT_ID=acme-ml", f"TAG={TAG}", f"PIPELINE_FILE={out}")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(_printed_command(result.stdout, " pipeline compile "))
    if not (ROOT / argv[0]).exists():
        pytest.skip(f"{argv[0]} is not installed: run `make setup`")
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    pipeline_spec, platform_spec = yaml.safe_load_all(out.read_text())
    options = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            options[arg] = argv[i + 1] if has_value else True
    return {
        "options": options,
        "spec": pipeline_spec,
        "executors": platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"],
    }


def _task_executors(compiled: dict) -> dict[str, tuple[dict, dict]]:
    """Task name -> (container spec, Kubernetes platform spec) for every container task."""
    executors = compiled["spec"]["deploymentSpec"]["executors"]
    return {
        name.removeprefix("exec-"): (executors[name]["container"], compiled["executors"].get(name, {}))
        for name in executors
    }


# --- NetworkPolicy semantics (networking.k8s.io/v1), enough to evaluate the manifests' policies -----------------


def _selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """LabelSelector semantics: matchLabels and matchExpressions all hold; an empty selector selects all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _peer_admits(peer: dict, policy_ns: str, pod_labels: dict, pod_ns: str) -> bool:
    if "ipBlock" in peer:  # CIDRs: not how pods are selected here
        return False
    ns_selector, pod_selector = peer.get("namespaceSelector"), peer.get("podSelector")
    if ns_selector is None:  # a bare podSelector means the policy's own namespace
        in_ns = pod_ns == policy_ns
    else:  # Kubernetes labels every namespace with its name
        in_ns = _selects(ns_selector, {"kubernetes.io/metadata.name": pod_ns})
    return in_ns and (pod_selector is None or _selects(pod_selector, pod_labels))


def _port_admits(ports: list[dict] | None, port: int, port_name: str | None) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        if p.get("port") is None or p["port"] in (port, port_name):
            return True
        if isinstance(p["port"], int) and p["port"] <= port <= p.get("endPort", p["port"]):
            return True
    return False


def ingress_allowed(objects: list[dict], target: dict, source_labels: dict, source_ns: str) -> bool:
    """Whether a pod (``source_labels`` in ``source_ns``) may open a TCP connection to ``target``'s port.

    ``target``: {"labels", "namespace", "port", "port_name"} of the receiving pod. Policies are additive: with no
    policy selecting the target everything is allowed, otherwise any rule of any selecting policy must admit.
    """
    policies = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy"
        and o["metadata"]["namespace"] == target["namespace"]
        and _selects(o["spec"].get("podSelector"), target["labels"])
        and "Ingress" in o["spec"].get("policyTypes", ["Ingress"])
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from") or []
            from_ok = not peers or any(
                _peer_admits(peer, target["namespace"], source_labels, source_ns) for peer in peers
            )
            if from_ok and _port_admits(rule.get("ports"), target["port"], target["port_name"]):
                return True
    return False


def mlflow_target(objects: list[dict]) -> dict:
    """The pod and port that the pipeline's MLFLOW_TRACKING_URI leads to: ConfigMap -> Service -> Deployment."""
    name, key = SETTINGS_CONFIGMAP
    settings = find(objects, "ConfigMap", name)
    assert settings["metadata"]["namespace"] == placement.RUN_NAMESPACE, "the ConfigMap must be where pods run"
    url = urlsplit(settings["data"][key])
    service_name, namespace, *rest = url.hostname.split(".")
    assert rest in ([], ["svc"], ["svc", "cluster", "local"]), url.hostname
    service = find(objects, "Service", service_name)
    assert service["metadata"]["namespace"] == namespace
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == (url.port or 80)]
    deployments = [
        o
        for o in objects
        if o["kind"] == "Deployment"
        and o["metadata"]["namespace"] == namespace
        and _selects({"matchLabels": service["spec"]["selector"]}, o["spec"]["template"]["metadata"]["labels"])
    ]
    assert len(deployments) == 1, f"Service {service_name} selects {len(deployments)} Deployments"
    pod = deployments[0]["spec"]["template"]
    target_port = service_port.get("targetPort", service_port["port"])
    for container in pod["spec"]["containers"]:
        for p in container.get("ports", []):
            if target_port in (p["containerPort"], p.get("name")):
                return {
                    "labels": pod["metadata"]["labels"],
                    "namespace": namespace,
                    "port": p["containerPort"],
                    "port_name": p.get("name"),
                }
    raise AssertionError(f"no container port {target_port!r} behind Service {service_name}")


def test_every_pipeline_pod_carries_the_role_label_and_reaches_mlflow(rendered, make_compile):
    tasks = _task_executors(make_compile)
    for task, (_, k8s) in tasks.items():
        labels = k8s["podMetadata"]["labels"]
        assert labels == {**placement.POD_LABELS, placement.STAGE_LABEL_KEY: labels[placement.STAGE_LABEL_KEY]}, task
    for overlay, objects in rendered.items():
        target = mlflow_target(objects)
        for task, (_, k8s) in tasks.items():
            labels = k8s["podMetadata"]["labels"]
            assert ingress_allowed(objects, target, labels, placement.RUN_NAMESPACE), (
                f"{overlay}: MLflow's NetworkPolicy refuses the {task} pod ({labels} in {placement.RUN_NAMESPACE})"
            )


def test_mlflow_admits_nothing_else(rendered, make_compile):
    """The evaluation above can fail: the same pods without the role label, or elsewhere, are refused."""
    _, k8s = _task_executors(make_compile)["register"]
    labels = k8s["podMetadata"]["labels"]
    unlabelled = {k: v for k, v in labels.items() if k != placement.ROLE_LABEL[0]}
    for objects in rendered.values():
        target = mlflow_target(objects)
        assert not ingress_allowed(objects, target, unlabelled, placement.RUN_NAMESPACE)
        assert not ingress_allowed(objects, target, labels, "default")
        # The KFP UI never talks to MLflow, so it is not let in.
        assert not ingress_allowed(objects, target, {"app": "ml-pipeline-ui"}, placement.RUN_NAMESPACE)
        # The Job that creates the pipeline's MLflow user is.
        job = find(objects, "Job", "mlflow-bootstrap-users")
        job_labels = job["spec"]["template"]["metadata"]["labels"]
        assert ingress_allowed(objects, target, job_labels, job["metadata"]["namespace"])
        wrong_port = {**target, "port": target["port"] + 1, "port_name": None}
        assert not ingress_allowed(objects, wrong_port, labels, placement.RUN_NAMESPACE)


def test_the_tracking_uri_names_a_host_mlflow_accepts(rendered):
    for objects in rendered.values():
        uri = find(objects, "ConfigMap", SETTINGS_CONFIGMAP[0])["data"][SETTINGS_CONFIGMAP[1]]
        args = find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["args"]
        (hosts,) = [a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts=")]
        assert urlsplit(uri).netloc in hosts.split(","), f"MLflow would answer 403 to Host {urlsplit(uri).netloc}"


# --- checkpoints -------------------------------------------------------------------------------------------------


def _infra_env() -> dict[str, str]:
    text = (ROOT / "manifests" / "base" / "infra.env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def _image_user() -> set[str]:
    users = set()
    dockerfile = (ROOT / "images" / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)\n(.*?)(?=^FROM\s|\Z)", dockerfile, flags=re.M | re.S))
    for flavour in ("cpu", "gpu"):
        users.add(re.findall(r"^USER\s+(\S+)", stages[flavour], flags=re.M)[-1])
    assert len(users) == 1, f"the CPU and GPU images run as different users: {users}"
    return users


def test_make_compile_mounts_the_checkpoint_claim_the_manifests_create(rendered, make_compile):
    options = make_compile["options"]
    claim = options.get("--checkpoint-pvc")
    assert claim and options.get("--checkpoint-gcsfuse") is True, f"make compile passes {options}"
    for task, (_, k8s) in _task_executors(make_compile).items():
        annotations = k8s.get("podMetadata", {}).get("annotations", {})
        if task in TRAIN_TASKS:
            assert [(m["constant"], m["mountPath"]) for m in k8s["pvcMount"]] == [(claim, CHECKPOINT_MOUNT)], task
            assert annotations == dict([GCSFUSE_ANNOTATION]), task
        else:
            assert "pvcMount" not in k8s and not annotations, task
    inputs = make_compile["spec"]["root"]["inputDefinitions"]["parameters"]
    assert inputs["checkpoint_root"]["defaultValue"] == CHECKPOINT_MOUNT

    env = _infra_env()
    bucket_url = urlsplit(env["CHECKPOINTS_URI"])
    (user,) = _image_user()
    uid, _, gid = user.partition(":")
    for overlay, objects in rendered.items():
        pvc = find(objects, "PersistentVolumeClaim", claim)
        assert pvc["metadata"]["namespace"] == placement.RUN_NAMESPACE, overlay
        pv = find(objects, "PersistentVolume", pvc["spec"]["volumeName"])
        assert pv["spec"]["claimRef"] == {"namespace": placement.RUN_NAMESPACE, "name": claim}
        assert pv["spec"]["storageClassName"] == pvc["spec"]["storageClassName"] == ""
        assert "ReadWriteMany" in pv["spec"]["accessModes"] and "ReadWriteMany" in pvc["spec"]["accessModes"]
        assert pv["spec"]["csi"]["driver"] == GCSFUSE_DRIVER
        assert pv["spec"]["csi"]["volumeHandle"] == bucket_url.hostname
        options_ = dict(o.partition("=")[::2] for o in pv["spec"]["mountOptions"])
        assert options_["only-dir"] == bucket_url.path.strip("/")
        assert (options_["uid"], options_["gid"]) == (uid, gid or uid), "the images' user must own the mount"
        # The stage outputs written onto it (a TrainJob's adapter) are renamed into place as folders.
        assert int(options_.get("rename-dir-limit", 0)) >= 100, "gcsfuse would refuse the adapter folder's rename"


def test_checkpoint_volume_follows_terraforms_values(tmp_path):
    """What `make apply` renders with terraform's infra.env: the volume points at that project's bucket."""
    import shutil

    shutil.copytree(ROOT / "manifests", tmp_path / "manifests")
    env = _infra_env()
    env["CHECKPOINTS_URI"] = "gs://acme-ml-kubetune-artifacts/checkpoints"
    (tmp_path / "manifests" / "base" / "infra.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    pv = find(render(tmp_path / "manifests" / "overlays" / "prod"), "PersistentVolume", "kubetune-checkpoints")
    assert pv["spec"]["csi"]["volumeHandle"] == "acme-ml-kubetune-artifacts"
    assert "only-dir=checkpoints" in pv["spec"]["mountOptions"]


def test_terraform_provides_what_the_checkpoint_volume_needs(parsed):
    cluster = tf_resources(parsed, "modules/cluster", "google_container_cluster")["this"]
    addons = cluster["addons_config"][0]
    assert addons["gcs_fuse_csi_driver_config"][0]["enabled"] is True, "the GCS FUSE CSI driver addon is off"
    assert cluster["workload_identity_config"][0]["workload_pool"] == "${var.project_id}.svc.id.goog"
    for pool in tf_resources(parsed, "modules/node_pools", "google_container_node_pool").values():
        assert pool["node_config"][0]["workload_metadata_config"][0]["mode"] == "GKE_METADATA"
    # infra.env's CHECKPOINTS_URI is the storage module's prefix, which the lifecycle rule expires.
    outputs = tf_blocks(parsed, "modules/storage", "output")
    prefix = urlsplit(_infra_env()["CHECKPOINTS_URI"]).path.strip("/")
    assert outputs["checkpoints_uri"]["value"] == "${google_storage_bucket.artifacts.url}/" + prefix
    env_output = tf_blocks(parsed, "envs/dev", "output")["kubetune_infra_env"]["value"]
    assert "CHECKPOINTS_URI=${module.storage.checkpoints_uri}" in env_output
    # Both identities a run can have may read and write objects in the bucket: kubetune-pipeline (submit,
    # schedule) through its Google service account, KFP's default runner (UI runs) as a principal.
    variables = tf_blocks(parsed, "modules/iam", "variable")
    assert variables["pipeline_ksa"]["default"] == {
        "namespace": placement.RUN_NAMESPACE,
        "name": placement.SERVICE_ACCOUNT,
    }
    assert variables["kfp_default_runner_ksa"]["default"] == {
        "namespace": placement.RUN_NAMESPACE,
        "name": placement.KFP_DEFAULT_SERVICE_ACCOUNT,
    }
    grants = tf_resources(parsed, "modules/iam", "google_storage_bucket_iam_member")
    object_roles = {"roles/storage.objectUser", "roles/storage.objectAdmin"}
    assert grants["pipeline_objects"]["role"] in object_roles
    assert grants["pipeline_objects"]["member"] == "${google_service_account.pipeline.member}"
    assert grants["kfp_default_runner_objects"]["role"] in object_roles
    assert grants["kfp_default_runner_objects"]["member"] == "${local.kfp_default_runner_principal}"
    principal = tf_blocks(parsed, "modules/iam", "locals")["kfp_default_runner_principal"]
    assert "/subject/ns/%s/sa/%s" in principal and "var.kfp_default_runner_ksa.namespace" in principal
    wi = tf_resources(parsed, "modules/iam", "google_service_account_iam_member")["pipeline_workload_identity"]
    assert wi["member"].endswith("[${var.pipeline_ksa.namespace}/${var.pipeline_ksa.name}]")


# --- Secrets, ConfigMap, service account ------------------------------------------------------------------------

_FAKE_KUBECTL = r"""
import json, sys

args = sys.argv[1:]
ns = "default"
if "-n" in args:
    i = args.index("-n")
    ns = args[i + 1]
    args = args[:i] + args[i + 2 :]
words = [a for a in args if not a.startswith("-")]
if words[:2] == ["get", "secret"]:
    sys.exit(1)  # a first deploy: no Secret exists yet
if words[:3] == ["create", "secret", "generic"]:
    name = words[3]
    data = {}
    for arg in args:
        if arg.startswith("--from-env-file="):
            for line in open(arg.split("=", 1)[1]).read().splitlines():
                if line.strip():
                    key, _, value = line.partition("=")
                    data[key] = value
        elif arg.startswith("--from-literal="):
            key, _, value = arg.split("=", 1)[1].partition("=")
            data[key] = value
    with open(sys.argv[0] + ".log", "a") as log:
        log.write(json.dumps({"namespace": ns, "name": name, "data": data}) + "\n")
elif words[:1] == ["apply"]:
    sys.stdin.read()
"""


def _run_make_secrets(tmp_path: Path, hf_token: str | None) -> dict[tuple[str, str], dict[str, str]]:
    """`make secrets` against fake tools; returns (namespace, name) -> data of every Secret it created."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "kubectl.py"
    script.write_text(_FAKE_KUBECTL)
    fakes = fake_bin(
        tmp_path,
        {
            "kubectl": f'exec {sys.executable} {script} "$@"\n',
            "terraform": 'if [ "$1 $2 $3" = "-chdir=terraform/envs/dev output -raw" ]; then printf db-secret; fi\n',
            "openssl": "printf 0123456789abcdef\n",
        },
    )
    extra = {"HF_TOKEN": hf_token} if hf_token is not None else {}
    result = make("secrets", "PROJECT_ID=acme-ml", path=f"{fakes}:/usr/bin:/bin", extra_env=extra)
    assert result.returncode == 0, result.stderr
    created: dict[tuple[str, str], dict[str, str]] = {}
    for line in Path(f"{script}.log").read_text().splitlines():
        entry = json.loads(line)
        key = (entry["namespace"], entry["name"])
        assert key not in created, f"make secrets created {key} twice"
        created[key] = entry["data"]
    return created


def test_make_secrets_creates_exactly_what_the_pipeline_reads(tmp_path, make_compile, rendered):
    # What the compiled pipeline's pods read, from its platform spec.
    wanted_secrets: dict[str, set[str]] = {}
    wanted_configmaps: dict[str, set[str]] = {}
    for _, k8s in _task_executors(make_compile).values():
        for ref in k8s.get("secretAsEnv", []):
            wanted_secrets.setdefault(ref["secretName"], set()).update(k["secretKey"] for k in ref["keyToEnv"])
        for ref in k8s.get("configMapAsEnv", []):
            keys = {k["configMapKey"] for k in ref["keyToEnv"]}
            wanted_configmaps.setdefault(ref["configMapName"], set()).update(keys)
    assert wanted_secrets == {HF_SECRET[0]: {HF_SECRET[1]}, MLFLOW_SECRET[0]: set(MLFLOW_SECRET[1])}
    assert wanted_configmaps == {SETTINGS_CONFIGMAP[0]: {SETTINGS_CONFIGMAP[1]}}

    for hf_token in ("hf_exampleToken", None):
        created = _run_make_secrets(tmp_path / str(hf_token), hf_token)
        in_run_ns = {name: data for (ns, name), data in created.items() if ns == placement.RUN_NAMESPACE}
        assert {name: set(data) for name, data in in_run_ns.items()} == wanted_secrets, created
        assert in_run_ns[HF_SECRET[0]][HF_SECRET[1]] == (hf_token or "")
        assert all(in_run_ns[MLFLOW_SECRET[0]].values()), "the MLflow credentials are empty"
        # The bootstrap Job creates the MLflow user from the kubetune copy; the pipeline logs in with its own.
        assert created[("kubetune", MLFLOW_SECRET[0])] == in_run_ns[MLFLOW_SECRET[0]]
        for objects in rendered.values():
            job = find(objects, "Job", "mlflow-bootstrap-users")
            for env in job["spec"]["template"]["spec"]["containers"][0]["env"]:
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in created[(job["metadata"]["namespace"], ref["name"])], ref

    for objects in rendered.values():
        for name, keys in wanted_configmaps.items():
            configmap = find(objects, "ConfigMap", name)
            assert configmap["metadata"]["namespace"] == placement.RUN_NAMESPACE
            assert keys <= set(configmap["data"])


def test_runs_execute_as_a_service_account_the_manifests_create(rendered):
    assert DEFAULT_SERVICE_ACCOUNT == placement.SERVICE_ACCOUNT
    for objects in rendered.values():
        account = find(objects, "ServiceAccount", placement.SERVICE_ACCOUNT)
        assert account["metadata"]["namespace"] == placement.RUN_NAMESPACE
        assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        binding = find(objects, "RoleBinding", placement.SERVICE_ACCOUNT)
        assert {"kind": "ServiceAccount", "name": placement.SERVICE_ACCOUNT, "namespace": placement.RUN_NAMESPACE} in (
            binding["subjects"]
        )
        assert binding["metadata"]["namespace"] == placement.RUN_NAMESPACE


def test_make_talks_to_kfp_in_the_namespace_where_runs_execute():
    out = make("-n", "upload", "urls").stdout
    assert f"kubectl -n {placement.RUN_NAMESPACE} port-forward svc/ml-pipeline-ui" in out


# --- images ------------------------------------------------------------------------------------------------------


def test_make_compile_uses_the_images_make_images_builds_and_pushes(make_compile):
    options = make_compile["options"]
    cpu, gpu = options["--cpu-image"], options["--gpu-image"]
    assert cpu.rsplit("/", 1)[1].split(":")[0] == CPU_IMAGE_NAME
    assert gpu.rsplit("/", 1)[1].split(":")[0] == GPU_IMAGE_NAME
    for task, (container, _) in _task_executors(make_compile).items():
        assert container["image"] == (gpu if task == "train-gpu" else cpu), task

    # Docker path: the Dockerfile each reference is built from, and the push.
    out = make("-n", "images", "PROJECT_ID=acme-ml", f"TAG={TAG}").stdout.replace("\\\n", " ")
    built = dict(re.findall(r"docker build --file images/Dockerfile --target (\S+) .*?--tag (\S+)", out))
    assert built["cpu"] == cpu and built["gpu"] == gpu
    for ref in (cpu, gpu):
        assert f"docker push {ref}" in out

    # Cloud Build path: the same references after substitution, and listed for the push.
    (subs,) = re.findall(r"--substitutions (\S+)", out)
    values = dict(item.split("=", 1) for item in subs.split(","))
    cloudbuild = yaml.safe_load((ROOT / "images" / "cloudbuild.yaml").read_text())

    def expand(text: str) -> str:
        return re.sub(r"\$\{(_[A-Z_]+)\}", lambda m: values[m.group(1)], text)

    tags = {}
    for step in cloudbuild["steps"]:
        args = dict(a.split("=", 1) for a in step["args"] if a.startswith("--"))
        assert args["--file"] == "images/Dockerfile"
        tags[args["--target"]] = expand(args["--tag"])
    assert tags["cpu"] == cpu and tags["gpu"] == gpu
    pushed = {expand(i) for i in cloudbuild["images"]}
    assert {cpu, gpu} <= pushed


# --- multi-node training: the Trainer runtimes --------------------------------------------------------------------


def _runtime_pods(objects: list[dict]) -> dict[str, tuple[dict, dict]]:
    """Runtime name -> (pod template metadata, pod spec) of its "node" job."""
    out = {}
    for runtime in (o for o in objects if o["kind"] == "ClusterTrainingRuntime"):
        (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
        pod = job["template"]["spec"]["template"]
        out[runtime["metadata"]["name"]] = (pod["metadata"], pod["spec"])
    return out


def test_runtimes_place_their_pods_on_the_pools_terraform_labels_and_taints(rendered, parsed):
    """The runtimes' placement == pipelines.placement.POOLS == terraform's placement.tf, per pool."""
    local = tf_blocks(parsed, "modules/node_pools", "locals")
    effect = {"NO_SCHEDULE": "NoSchedule"}[local["pool_taint_effect"]]
    for objects in rendered.values():
        pods = _runtime_pods(objects)
        assert set(pods) == set(placement.TRAINING_RUNTIMES.values())
        for pool, runtime in placement.TRAINING_RUNTIMES.items():
            _, spec = pods[runtime]
            value = local["pool_label_values"][pool]
            assert spec["nodeSelector"] == {local["pool_label_key"]: value}
            assert (placement.POOLS[pool]["label_key"], placement.POOLS[pool]["label_value"]) == (
                local["pool_label_key"],
                value,
            )
            pool_toleration = {"key": local["pool_label_key"], "operator": "Equal", "value": value, "effect": effect}
            assert pool_toleration in spec["tolerations"]
            assert placement.taint(pool) == f"{pool_toleration['key']}={value}:{effect}"
            gpu_toleration = {"key": placement.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
            (container,) = spec["containers"]
            assert container["name"] == placement.TRAINJOB_CONTAINER
            limits = container["resources"]["limits"]
            if pool == "gpu":
                assert gpu_toleration in spec["tolerations"] and limits[placement.GPU_RESOURCE] == placement.GPU_COUNT
            else:
                assert gpu_toleration not in spec["tolerations"] and placement.GPU_RESOURCE not in limits
            # One training pod is one node's worth of the single-node train task's size.
            sizes = placement.RESOURCES[f"train-{pool}"]
            assert (limits["cpu"], limits["memory"]) == (sizes["cpu_limit"], sizes["memory_limit"])


def test_runtime_pods_are_pipeline_pods_mlflow_admits_running_as_the_images_user(rendered):
    (user,) = _image_user()
    uid, _, gid = user.partition(":")
    for objects in rendered.values():
        target = mlflow_target(objects)
        for metadata, spec in _runtime_pods(objects).values():
            assert placement.POD_LABELS.items() <= metadata["labels"].items()
            assert ingress_allowed(objects, target, metadata["labels"], placement.RUN_NAMESPACE)
            assert spec["serviceAccountName"] == placement.SERVICE_ACCOUNT
            context = spec["securityContext"]
            assert (str(context["runAsUser"]), str(context["runAsGroup"])) == (uid, gid or uid)
