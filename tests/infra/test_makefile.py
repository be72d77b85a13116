"""mk/infra.mk: `make -n deploy` prints the whole sequence in order, every target is exercised, and the steps
that guard the operator (prerequisites, destroy's confirmation, apply's values) are run for real against fake
`terraform` and `kubectl` executables on PATH. Nothing here touches a cloud or writes outside tmp folders.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from .conftest import ROOT, binary, fake_bin, find, make, render

pytestmark = pytest.mark.infra

MK = ROOT / "mk" / "infra.mk"
REG = "us-central1-docker.pkg.dev/acme-ml/kubetune"


def dry(*args: str) -> str:
    result = make("-n", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _positions(text: str, needles: list[str]) -> list[int]:
    positions = []
    for needle in needles:
        index = text.find(needle)
        assert index >= 0, f"`{needle}` not in the printed sequence"
        positions.append(index)
    return positions


def infra_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):[^=\n]*##", MK.read_text(), flags=re.M))


def test_every_target_is_documented_and_none_collides_with_the_root_makefile():
    text = MK.read_text()
    declared = set(re.findall(r"^([a-z][a-z0-9-]*):(?!=)", text, flags=re.M))
    assert declared == infra_targets(), f"targets without a ## description: {declared - infra_targets()}"
    reserved = {
        "help",
        "setup",
        "lint",
        "format",
        "test",
        "test-unit",
        "test-slow",
        "test-reliability",
        "test-gpu",
        "run",
        "clean",
    }
    assert not declared & reserved
    help_text = make("help").stdout
    for target in declared:
        assert target in help_text


def test_make_n_deploy_prints_the_full_sequence_in_order():
    out = dry("deploy", "PROJECT_ID=acme-ml")
    tag = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    sequence = [
        "command -v gcloud",
        "terraform -chdir=terraform/envs/dev init -input=false",
        "terraform -chdir=terraform/envs/dev apply -input=false",
        "gcloud container clusters get-credentials",
        "docker build --file images/Dockerfile --target cpu --build-arg TORCH_VERSION=2.13.0 "
        f"--tag {REG}/kubetune-cpu:{tag}",
        f"docker push {REG}/kubetune-cpu:{tag}",
        "gcloud builds submit --project acme-ml --region us-central1 --config images/cloudbuild.yaml",
        "kubectl apply -k manifests/kfp/cluster-scoped",
        "kubectl wait --for condition=established",
        "kubectl apply -k manifests/kfp\n",
        "kubectl apply --server-side -k manifests/trainer",
        "crd/trainjobs.trainer.kubeflow.org",
        "kubectl -n kubeflow-system wait --for=condition=Available deployment --all",
        "create secret generic mlflow-db",
        "kubectl apply -k build/deploy/dev",
        "kubectl -n kubeflow wait --for=condition=Available deployment --all",
        "kubectl -n kubetune rollout status deployment/mlflow",
        f"pipeline compile --out build/sft_pipeline.yaml --cpu-image {REG}/kubetune-cpu:{tag} "
        f"--gpu-image {REG}/kubetune-gpu:{tag}",
        "pipeline upload --host",
        "port-forward svc/ml-pipeline-ui 8080:80   then open",
    ]
    positions = _positions(out, sequence)
    assert positions == sorted(positions), "deploy steps are out of order"


def test_deploy_with_a_given_tag_reuses_the_pushed_images():
    out = dry("deploy", "PROJECT_ID=acme-ml", "TAG=abc1234", "ENV=prod")
    assert "docker build" not in out and "gcloud builds submit" not in out
    assert "using the images already pushed with tag abc1234" in out
    assert f"--cpu-image {REG}/kubetune-cpu:abc1234 --gpu-image {REG}/kubetune-gpu:abc1234" in out
    assert "kubectl apply -k build/deploy/prod" in out
    assert "statefulset/postgres" not in out  # prod has no in-cluster database


# target -> (extra make arguments, what `make -n` must print, in this order)
DRY_RUN = {
    "infra-tools": (
        ["INFRA_VENV=/tmp/x-infra", "HCL_VENV=/tmp/x-hcl"],
        [
            "-m venv /tmp/x-infra",
            "/tmp/x-infra/bin/pip install -q -r requirements/infra-tools.txt",
            "/tmp/x-infra/bin/pip check",
            "-m venv /tmp/x-hcl",
            "requirements/infra-hcl2.txt",
        ],
    ),
    "infra-check": ([], ["pytest -m infra tests/infra"]),
    "render": ([], ["kubectl kustomize manifests/overlays/$overlay > build/manifests/$overlay.yaml"]),
    "constraints": ([], ["pip freeze --exclude-editable", "> images/constraints.txt"]),
    "images": (
        ["PROJECT_ID=acme-ml", "TAG=t1"],
        [
            f"--tag {REG}/kubetune-cpu:t1",
            f"--tag {REG}/kubetune-gpu:t1",
            f"--tag {REG}/kubetune-mlflow:t1",
            f"docker push {REG}/kubetune-cpu:t1",
            "--config images/cloudbuild.yaml",
            "--service-account projects/acme-ml/serviceAccounts/kubetune-build@acme-ml.iam.gserviceaccount.com",
            f"_REGISTRY={REG},_TAG=t1,_TORCH_VERSION=2.13.0",
        ],
    ),
    "compile": (
        ["PROJECT_ID=acme-ml", "TAG=t1"],
        [
            f"kubetune pipeline compile --out build/sft_pipeline.yaml --cpu-image {REG}/kubetune-cpu:t1 "
            f"--gpu-image {REG}/kubetune-gpu:t1",
            "--checkpoint-pvc kubetune-checkpoints --checkpoint-gcsfuse",
        ],
    ),
    "upload": (
        ["KFP_HOST=https://kfp.example.com"],
        [
            'host="https://kfp.example.com"',
            'kubetune pipeline upload --host "$host" --file build/sft_pipeline.yaml',
        ],
    ),
    "schedule": (
        ["CONFIG=configs/x.yaml", "CRON=0 4 * * 1"],
        ['kubetune pipeline schedule --host "$host" --cron "0 4 * * 1" --config configs/x.yaml'],
    ),
    "tf-apply": (
        ["PROJECT_ID=acme-ml", "AUTO_APPROVE=yes", "TF_ENV=dev"],
        [
            "terraform -chdir=terraform/envs/dev init -input=false",
            "terraform -chdir=terraform/envs/dev apply -input=false -auto-approve",
            "-var project_id=acme-ml -var region=us-central1",
        ],
    ),
    "credentials": (
        ["PROJECT_ID=acme-ml"],
        [
            'get-credentials "$(terraform -chdir=terraform/envs/dev output -raw cluster_name)"',
            "--location us-central1 --project acme-ml --dns-endpoint",
        ],
    ),
    "kfp-install": (
        [],
        [
            "kubectl apply -k manifests/kfp/cluster-scoped",
            "kubectl wait --for condition=established --timeout=120s crd/applications.app.k8s.io",
            "kubectl apply -k manifests/kfp\n",
        ],
    ),
    "trainer-install": (
        [],
        [
            "kubectl apply --server-side -k manifests/trainer",
            "kubectl wait --for condition=established --timeout=120s crd/trainjobs.trainer.kubeflow.org",
            "crd/clustertrainingruntimes.trainer.kubeflow.org crd/jobsets.jobset.x-k8s.io",
            "kubectl -n kubeflow-system wait --for=condition=Available deployment --all --timeout=10m",
        ],
    ),
    "secrets": (
        ["PROJECT_ID=acme-ml"],
        [
            "secret generic mlflow-db",
            "output -raw mlflow_db_password",
            "secret generic mlflow-auth",
            "secret generic mlflow-client",
            "secret generic hf-token",
        ],
    ),
    "wait": (
        ["ENV=dev"],
        [
            "kubectl -n kubeflow wait --for=condition=Available deployment --all",
            "rollout status statefulset/postgres",
            "rollout status deployment/mlflow",
            "wait --for=condition=complete job/mlflow-bootstrap-users",
        ],
    ),
    "urls": (
        [],
        [
            "kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80",
            "kubectl -n kubetune port-forward svc/mlflow 5000:5000",
        ],
    ),
}
# Run for real below (with fake tools), or covered by the ordered deploy tests above.
EXECUTED = {"deploy", "deploy-prereqs", "destroy", "apply"}


def test_every_target_is_covered_by_a_test():
    assert infra_targets() == set(DRY_RUN) | EXECUTED


@pytest.mark.parametrize("target", sorted(DRY_RUN))
def test_dry_run_of_each_target(target):
    args, expected = DRY_RUN[target]
    out = dry(target, *args)
    positions = _positions(out, expected)
    assert positions == sorted(positions), f"{target}: steps out of order"


def test_secrets_never_put_values_on_a_command_line():
    out = dry("secrets", "PROJECT_ID=acme-ml")
    assert "--from-literal=password" not in out and "PASSWORD=" not in re.sub(r"printf '[^']*'", "", out)


def test_deploy_prereqs_names_every_missing_tool_and_what_to_do(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = make("deploy-prereqs", path=str(empty))
    assert result.returncode != 0
    for expected in (
        "missing: gcloud. Install the Google Cloud CLI",
        "missing: gke-gcloud-auth-plugin. Run 'gcloud components install gke-gcloud-auth-plugin'",
        "missing: terraform. Install Terraform",
        "missing: kubectl.",
        "missing: openssl",
        "missing: PROJECT_ID. Pass your Google Cloud project: make deploy-prereqs PROJECT_ID=",
    ):
        assert expected in result.stderr, expected


def test_deploy_prereqs_pass_when_everything_is_there(tmp_path):
    fakes = fake_bin(
        tmp_path,
        {t: "exit 0\n" for t in ("gcloud", "gke-gcloud-auth-plugin", "terraform", "kubectl", "openssl")},
    )
    result = make("deploy-prereqs", "PROJECT_ID=acme-ml", path=fakes)
    assert result.returncode == 0, result.stderr
    assert "missing" not in result.stderr


def test_targets_refuse_to_run_without_their_inputs(tmp_path):
    result = make("images")
    assert result.returncode != 0 and "missing: PROJECT_ID" in result.stderr
    result = make("schedule")
    assert result.returncode != 0 and "set CONFIG" in result.stderr
    result = make("upload", f"PIPELINE_FILE={tmp_path / 'none.yaml'}")
    assert result.returncode != 0 and "run 'make compile' first" in result.stderr


@pytest.fixture
def fake_terraform(tmp_path):
    log = tmp_path / "terraform.log"
    fakes = fake_bin(tmp_path, {"terraform": f'echo "$@" >> {log}\n'})
    return fakes, log


def test_destroy_aborts_unless_the_project_id_is_typed(fake_terraform):
    fakes, log = fake_terraform
    path = f"{fakes}:/usr/bin:/bin"
    result = make("destroy", "PROJECT_ID=acme-ml", path=path, stdin="yes\n")
    assert result.returncode != 0 and "aborted: nothing was destroyed" in result.stderr
    assert not log.exists(), "terraform ran although the confirmation was wrong"
    result = make("destroy", "PROJECT_ID=acme-ml", path=path, stdin="")
    assert result.returncode != 0 and not log.exists(), "no answer (no terminal) must not destroy"
    result = make("destroy", "PROJECT_ID=acme-ml", path=path, stdin="acme-ml\n")
    assert result.returncode == 0, result.stderr
    assert "destroy -input=false -auto-approve -var project_id=acme-ml" in log.read_text()


def test_destroy_with_confirm_yes_does_not_ask(fake_terraform):
    fakes, log = fake_terraform
    result = make("destroy", "PROJECT_ID=acme-ml", "CONFIRM=yes", "TF_ENV=dev", path=f"{fakes}:/usr/bin:/bin")
    assert result.returncode == 0, result.stderr
    assert "Type the project id" not in result.stdout
    assert log.read_text().startswith("-chdir=terraform/envs/dev destroy")


def test_apply_renders_the_overlay_with_terraform_values_and_the_tagged_image(tmp_path):
    kubectl = binary("kubectl")
    rendered = tmp_path / "applied.yaml"
    infra_env = (
        "PIPELINE_GSA=kubetune-pipeline@acme-ml.iam.gserviceaccount.com\n"
        "MLFLOW_GSA=kubetune-mlflow@acme-ml.iam.gserviceaccount.com\n"
        "MLFLOW_ARTIFACTS_DESTINATION=gs://acme-ml-kubetune-artifacts/mlflow\n"
        "PIPELINE_ROOT=gs://acme-ml-kubetune-artifacts/pipeline-root\n"
        "CHECKPOINTS_URI=gs://acme-ml-kubetune-artifacts/checkpoints\n"
        "CLOUDSQL_INSTANCE=acme-ml:us-central1:kubetune-dev-mlflow\n"
    )
    fakes = fake_bin(
        tmp_path,
        {
            "terraform": f"printf '%s' '{infra_env}'\n",
            # `kubectl apply -k DIR` renders DIR with the real kustomize into a file; other calls do nothing.
            "kubectl": f'if [ "$1" = apply ] && [ "$2" = -k ]; then\n'
            f'  exec {kubectl} kustomize "$3" > {rendered}\nfi\n',
        },
    )
    deploy_dir = tmp_path / "deploy"
    result = make(
        "apply",
        "PROJECT_ID=acme-ml",
        "TAG=abc1234",
        "ENV=dev",
        f"DEPLOY_DIR={deploy_dir}",
        path=f"{fakes}:/usr/bin:/bin",
    )
    assert result.returncode == 0, result.stderr
    objects = [o for o in yaml.safe_load_all(rendered.read_text()) if o]
    assert (
        find(objects, "ServiceAccount", "mlflow")["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        == "kubetune-mlflow@acme-ml.iam.gserviceaccount.com"
    )
    deployment = find(objects, "Deployment", "mlflow")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == f"{REG}/kubetune-mlflow:abc1234"
    assert find(objects, "StatefulSet", "postgres")
    # the tree in git still renders with its example values
    assert "example-project" in (ROOT / "manifests" / "base" / "infra.env").read_text()
    assert render(ROOT / "manifests" / "overlays" / "dev")
