"""Kubernetes manifests: every overlay renders offline, validates against the Kubernetes schemas, is
checkov-clean, and carries the settings the design asks for. The KFP install is a remote kustomize base
(GitHub), so it is not rendered here; its version pin is checked instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import (
    K8S_VERSION,
    OVERLAYS,
    ROOT,
    assert_clean,
    checkov,
    find,
    kubernetes_validate,
    render,
)

pytestmark = pytest.mark.infra

MLFLOW_URI = "http://mlflow.kubetune.svc.cluster.local:5000"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(ROOT / "manifests" / "overlays" / overlay) for overlay in OVERLAYS}


def _container(obj: dict, name: str) -> dict:
    spec = obj["spec"]["template"]["spec"]
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name} in {obj['metadata']['name']}")


def _args(container: dict) -> dict[str, str | bool]:
    out: dict[str, str | bool] = {}
    for arg in container.get("args", []):
        key, _, value = arg.partition("=")
        out[key] = value if value else True
    return out


def test_overlays_dev_and_prod_exist():
    assert set(OVERLAYS) == {"dev", "prod"}


def test_every_overlay_renders(rendered):
    for overlay, objects in rendered.items():
        kinds = {o["kind"] for o in objects}
        assert {
            "Namespace",
            "Deployment",
            "Service",
            "ServiceAccount",
            "NetworkPolicy",
            "ConfigMap",
            "Role",
            "RoleBinding",
        } <= kinds, overlay


def test_rendered_objects_validate_against_the_kubernetes_schemas(rendered, tmp_path):
    for overlay, objects in rendered.items():
        errors = kubernetes_validate(objects, tmp_path, overlay)
        assert errors == [], f"{overlay} does not validate against Kubernetes {K8S_VERSION}"


def test_schema_validation_catches_a_broken_object(tmp_path):
    """The validator above must be able to fail: a Deployment with a typo'd field is rejected."""
    broken = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "replicas": "two",
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": []}},
        },
    }
    assert kubernetes_validate([broken], tmp_path, "broken"), "an invalid Deployment passed validation"


def test_checkov_rendered_manifests_are_clean(rendered, tmp_path):
    for overlay, objects in rendered.items():
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(objects))
    assert_clean(checkov(tmp_path, "kubernetes"))


def test_mlflow_server_settings(rendered):
    for overlay, objects in rendered.items():
        deployment = find(objects, "Deployment", "mlflow")
        container = _container(deployment, "mlflow")
        assert container["command"] == ["mlflow", "server"]
        args = _args(container)
        assert args["--app-name"] == "basic-auth", overlay
        assert args["--serve-artifacts"] is True
        assert args["--artifacts-destination"] == "$(MLFLOW_ARTIFACTS_DESTINATION)"
        assert args["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
        hosts = args["--allowed-hosts"].split(",")
        for host in ("mlflow", "mlflow.kubetune", "mlflow.kubetune.svc", "mlflow.kubetune.svc.cluster.local"):
            assert host in hosts and f"{host}:5000" in hosts, host
        env = {e["name"]: e for e in container["env"]}
        # every env var the args reference is defined
        assert {
            "MLFLOW_ARTIFACTS_DESTINATION",
            "MLFLOW_BACKEND_STORE_URI",
            "PGPASSWORD",
            "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_AUTH_CONFIG_PATH",
        } <= set(env)
        backend = find(objects, "ConfigMap", "mlflow-config")["data"]["MLFLOW_BACKEND_STORE_URI"]
        assert backend.startswith("postgresql://mlflow@") and ":" not in backend.split("@")[0][len("postgresql://") :]
        # probes, resources, non-root, read-only root with an emptyDir /tmp
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["path"] == "/health"
        assert {"requests", "limits"} <= set(container["resources"])
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        ini = find(objects, "ConfigMap", "mlflow-auth-config")["data"]["basic_auth.ini"]
        assert "database_uri = postgresql://mlflow@" in ini and "password" not in ini.split("[mlflow]")[1]


def test_database_wiring_per_overlay(rendered):
    dev, prod = rendered["dev"], rendered["prod"]
    assert find(dev, "StatefulSet", "postgres")
    assert (
        "postgres.kubetune.svc.cluster.local"
        in find(dev, "ConfigMap", "mlflow-config")["data"]["MLFLOW_BACKEND_STORE_URI"]
    )
    assert not [o for o in prod if o["kind"] == "StatefulSet"]
    proxy = _container(find(prod, "Deployment", "mlflow"), "cloud-sql-proxy")
    assert proxy["restartPolicy"] == "Always", "native sidecar: starts before MLflow, stops after it"
    assert "$(CLOUDSQL_INSTANCE)" in proxy["args"] and "--private-ip" in proxy["args"]
    assert "127.0.0.1:5432" in find(prod, "ConfigMap", "mlflow-config")["data"]["MLFLOW_BACKEND_STORE_URI"]


def test_mlflow_is_cluster_internal_and_only_labelled_pipeline_pods_reach_it(rendered):
    """Whether the compiled pipeline's pods get through is tests/infra/test_pipeline_contract.py's business; here:
    nothing is exposed, every allowed peer is a labelled selection, and the KFP UI is not among them."""
    for objects in rendered.values():
        services = [o for o in objects if o["kind"] == "Service"]
        assert all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in services)
        assert not [o for o in objects if o["kind"] == "Ingress"]
        policy = find(objects, "NetworkPolicy", "mlflow-ingress")
        assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mlflow"}
        peers = [p for rule in policy["spec"]["ingress"] for p in rule["from"]]
        assert {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}},
            "podSelector": {"matchLabels": {"kubetune.io/role": "pipeline"}},
        } in peers
        for peer in peers:
            assert peer.get("podSelector", {}).get("matchLabels"), "every allowed peer is a labelled pod selection"
            assert peer["podSelector"]["matchLabels"].get("app") != "ml-pipeline-ui", "the KFP UI never talks to MLflow"
        deny = find(objects, "NetworkPolicy", "default-deny-ingress")
        assert deny["spec"]["podSelector"] == {} and deny["spec"]["policyTypes"] == ["Ingress"]


def test_pipeline_settings_service_accounts_and_no_secret_values_in_git(rendered):
    for objects in rendered.values():
        settings = find(objects, "ConfigMap", "kubetune-settings")
        assert settings["metadata"]["namespace"] == "kubeflow"
        assert settings["data"]["MLFLOW_TRACKING_URI"] == MLFLOW_URI
        assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created by make deploy, not git"
        for name, gsa in (("kubetune-pipeline", "kubetune-pipeline@"), ("mlflow", "kubetune-mlflow@")):
            sa = find(objects, "ServiceAccount", name)
            assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].startswith(gsa)
        role = find(objects, "Role", "kubetune-pipeline")
        verbs = {v for rule in role["rules"] for v in rule["verbs"]}
        assert "*" not in verbs and not verbs & {
            "delete",
            "deletecollection",
            "escalate",
            "bind",
            "impersonate",
        }
        assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    template = yaml.safe_load((ROOT / "manifests" / "base" / "hf-token.secret.example.yaml").read_text())
    assert template["stringData"] == {"HF_TOKEN": ""}


def test_deploy_values_reach_the_rendered_objects(tmp_path):
    """What `make apply` does: copy the tree, write terraform's infra.env, set the image, render."""
    shutil.copytree(ROOT / "manifests", tmp_path / "manifests")
    (tmp_path / "manifests" / "base" / "infra.env").write_text(
        "PIPELINE_GSA=kubetune-pipeline@acme-ml.iam.gserviceaccount.com\n"
        "MLFLOW_GSA=kubetune-mlflow@acme-ml.iam.gserviceaccount.com\n"
        "MLFLOW_ARTIFACTS_DESTINATION=gs://acme-ml-kubetune-artifacts/mlflow\n"
        "PIPELINE_ROOT=gs://acme-ml-kubetune-artifacts/pipeline-root\n"
        "CHECKPOINTS_URI=gs://acme-ml-kubetune-artifacts/checkpoints\n"
        "CLOUDSQL_INSTANCE=acme-ml:europe-west4:kubetune-dev-mlflow\n"
    )
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["manifests/overlays/prod"],
                "images": [
                    {
                        "name": "kubetune-mlflow",
                        "newName": "europe-west4-docker.pkg.dev/acme-ml/kubetune/kubetune-mlflow",
                        "newTag": "abc1234",
                    }
                ],
            }
        )
    )
    objects = render(tmp_path)
    assert (
        find(objects, "ServiceAccount", "mlflow")["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        == "kubetune-mlflow@acme-ml.iam.gserviceaccount.com"
    )
    assert (
        find(objects, "ServiceAccount", "kubetune-pipeline")["metadata"]["annotations"][
            "iam.gke.io/gcp-service-account"
        ]
        == "kubetune-pipeline@acme-ml.iam.gserviceaccount.com"
    )
    infra = find(objects, "ConfigMap", "kubetune-infra")["data"]
    assert infra["MLFLOW_ARTIFACTS_DESTINATION"] == "gs://acme-ml-kubetune-artifacts/mlflow"
    assert infra["CLOUDSQL_INSTANCE"] == "acme-ml:europe-west4:kubetune-dev-mlflow"
    images = {
        c["image"]
        for o in objects
        if o["kind"] in ("Deployment", "Job")
        for c in o["spec"]["template"]["spec"]["containers"]
    }
    assert "europe-west4-docker.pkg.dev/acme-ml/kubetune/kubetune-mlflow:abc1234" in images
    assert not any(i.startswith("kubetune-mlflow") for i in images)


def test_kfp_install_is_pinned_to_the_sdk_release():
    """The remote base cannot be fetched here (no GitHub access), so it is not rendered: its pin is."""
    import importlib.metadata

    sdk = importlib.metadata.version("kfp")
    refs = []
    for path in (ROOT / "manifests" / "kfp").rglob("kustomization.yaml"):
        for resource in yaml.safe_load(path.read_text())["resources"]:
            assert resource.startswith("github.com/kubeflow/pipelines/manifests/kustomize/"), resource
            refs.append(resource.rsplit("?ref=", 1)[1])
    assert len(refs) == 2 and len(set(refs)) == 1, refs
    assert refs[0].split(".")[:2] == sdk.split(".")[:2], f"KFP backend {refs[0]} vs kfp SDK {sdk}"


@pytest.mark.skip(reason="manifests/kfp is a remote kustomize base on GitHub, which this machine cannot reach")
def test_kfp_install_renders():  # pragma: no cover - documents the offline limit
    render(ROOT / "manifests" / "kfp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(port: int, host_header: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
        headers={"Host": host_header},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_mlflow_accepts_the_in_cluster_host_names_it_is_given(rendered, tmp_path):
    """A real MLflow server with the rendered --allowed-hosts answers the in-cluster names, refuses others."""
    mlflow = Path(sys.executable).parent / "mlflow"
    if not mlflow.exists():
        pytest.skip("mlflow is not installed in this environment")
    hosts = _args(_container(find(rendered["dev"], "Deployment", "mlflow"), "mlflow"))["--allowed-hosts"]
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ALLOWED_HOSTS": "", "HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [
            mlflow,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--serve-artifacts",
            "--allowed-hosts",
            hosts,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.5)
        for name in (
            "mlflow.kubetune.svc.cluster.local:5000",
            "mlflow.kubetune:5000",
            "mlflow:5000",
            f"localhost:{port}",
        ):
            assert _status(port, name) == 200, name
        assert _status(port, "evil.example.com") == 403
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
