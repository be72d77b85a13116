"""Terraform: formatting, every file parses, checkov is clean, and the modules say what the design says.

``terraform validate`` needs the providers, which cannot be downloaded here, so files are parsed with
python-hcl2 and the structure (pools, autoscaling, taints, typed and described variables) is asserted on the
parse tree.
"""

from __future__ import annotations

import re

import pytest

from .conftest import ROOT, TF_FILES, TF_ROOT, assert_clean, binary, checkov, run
from .conftest import tf_blocks as _blocks
from .conftest import tf_resources as _resources

pytestmark = pytest.mark.infra

MODULES = ["cluster", "node_pools", "storage", "registry", "database", "iam"]


def test_terraform_files_exist_for_every_module_and_env():
    for module in MODULES:
        for name in ("main.tf", "variables.tf", "outputs.tf", "versions.tf"):
            assert (TF_ROOT / "modules" / module / name).is_file(), f"modules/{module}/{name} missing"
    env = TF_ROOT / "envs" / "dev"
    for name in (
        "main.tf",
        "variables.tf",
        "outputs.tf",
        "versions.tf",
        "terraform.tfvars.example",
        "backend.tf.example",
    ):
        assert (env / name).is_file(), f"envs/dev/{name} missing"
    assert 'backend "gcs"' in (env / "backend.tf.example").read_text()


def test_terraform_fmt_check():
    result = run([binary("terraform"), "fmt", "-check", "-recursive", "-diff", TF_ROOT])
    assert result.returncode == 0, f"terraform fmt would change files:\n{result.stdout}{result.stderr}"


def test_every_tf_file_parses(parsed):
    assert set(parsed) == {p.relative_to(ROOT) for p in TF_FILES}
    assert len(parsed) >= 4 * len(MODULES) + 4


def test_variables_are_typed_and_described_and_outputs_described(parsed):
    folders = [f"modules/{m}" for m in MODULES] + ["envs/dev"]
    for folder in folders:
        variables = _blocks(parsed, folder, "variable")
        assert variables, f"{folder} declares no variables"
        for name, body in variables.items():
            assert "type" in body, f"{folder}: variable {name} has no type"
            assert len(body.get("description", "")) > 10, f"{folder}: variable {name} has no description"
        outputs = _blocks(parsed, folder, "output")
        assert outputs, f"{folder} declares no outputs"
        for name, body in outputs.items():
            assert len(body.get("description", "")) > 10, f"{folder}: output {name} has no description"


def test_google_provider_pinned_to_a_current_major(parsed):
    for path, tree in parsed.items():
        for block in tree.get("terraform", []):
            for providers in block.get("required_providers", []):
                if "google" in providers:
                    assert re.fullmatch(r"~> ?[67]\.\d+", providers["google"]["version"]), path


def test_cluster_is_private_with_workload_identity_shielded_nodes_and_release_channel(parsed):
    cluster = _resources(parsed, "modules/cluster", "google_container_cluster")["this"]
    private = cluster["private_cluster_config"][0]
    assert private["enable_private_nodes"] is True
    assert cluster["workload_identity_config"][0]["workload_pool"] == "${var.project_id}.svc.id.goog"
    assert cluster["release_channel"][0]["channel"] == "${var.release_channel}"
    assert cluster["enable_shielded_nodes"] is True
    assert cluster["remove_default_node_pool"] is True
    assert cluster["datapath_provider"] == "ADVANCED_DATAPATH"  # enforces the NetworkPolicies


def _placement_locals(parsed) -> dict:
    return _blocks(parsed, "modules/node_pools", "locals")


def test_c3_and_gpu_pools_scale_from_zero_with_labels_and_taints_from_the_contract(parsed):
    pools = _resources(parsed, "modules/node_pools", "google_container_node_pool")
    assert set(pools) == {"system", "cpu", "gpu"}
    for name in ("cpu", "gpu"):
        pool = pools[name]
        scaling = pool["autoscaling"][0]
        assert scaling["total_min_node_count"] == 0, f"{name} pool must scale from zero"
        assert pool["initial_node_count"] == 0
        node = pool["node_config"][0]
        assert node["labels"] == {"${(local.pool_label_key)}": f"${{local.pool_label_values.{name}}}"}
        assert node["taint"] == [
            {
                "key": "${local.pool_label_key}",
                "value": f"${{local.pool_label_values.{name}}}",
                "effect": "${local.pool_taint_effect}",
            }
        ]
        assert node["spot"] == f"${{var.{name}_spot}}"
        assert node["workload_metadata_config"][0]["mode"] == "GKE_METADATA"
        assert node["shielded_instance_config"][0]["enable_secure_boot"] is True
    # Only the system pool has no taint, and it never scales to zero (kube-system, KFP, MLflow live there).
    assert "taint" not in pools["system"]["node_config"][0]
    assert pools["system"]["autoscaling"][0]["min_node_count"] >= 1


def test_c3_pool_defaults_to_c3_standard_22_and_rejects_other_families(parsed):
    variables = _blocks(parsed, "modules/node_pools", "variable")
    assert variables["cpu_machine_type"]["default"] == "c3-standard-22"
    condition = variables["cpu_machine_type"]["validation"][0]["condition"]
    pattern = re.search(r'regex\("(.+?)",', condition).group(1).replace("\\\\", "\\")
    for ok in ("c3-standard-22", "c3-standard-8", "c3-highmem-44", "c3-standard-88-lssd"):
        assert re.search(pattern, ok), ok
    for bad in ("c3d-standard-16", "n2-standard-8", "c4-standard-8"):
        assert not re.search(pattern, bad), bad


def test_gpu_pool_is_l4_by_default_with_a100_h100_options_and_driver_installation(parsed):
    variables = _blocks(parsed, "modules/node_pools", "variable")
    assert variables["gpu_profile"]["default"] == "l4"
    profiles = _placement_locals(parsed)["gpu_profiles"]
    assert profiles["l4"] == {"machine_type": "g2-standard-8", "accelerator": "nvidia-l4", "count": 1}
    assert profiles["a100"]["machine_type"].startswith("a2-")
    assert profiles["h100"]["machine_type"].startswith("a3-")
    assert profiles["h100"]["accelerator"] == "nvidia-h100-80gb"
    gpu = _resources(parsed, "modules/node_pools", "google_container_node_pool")["gpu"]
    accel = gpu["node_config"][0]["guest_accelerator"][0]
    assert accel["gpu_driver_installation_config"][0]["gpu_driver_version"] == "${var.gpu_driver_version}"
    assert variables["gpu_driver_version"]["default"] == "LATEST"


def test_placement_contract_matches_the_pipeline(parsed):
    """Both sides of the contract: terraform's node labels and taints vs pipelines/placement.py."""
    try:
        from pipelines.placement import POOLS
    except ImportError as e:  # pragma: no cover - the pipeline module is another package's file
        pytest.skip(f"pipelines/placement.py is not importable yet ({e})")
    local = _placement_locals(parsed)
    effect = {
        "NO_SCHEDULE": "NoSchedule",
        "PREFER_NO_SCHEDULE": "PreferNoSchedule",
        "NO_EXECUTE": "NoExecute",
    }
    terraform_side = {
        pool: {
            "label_key": local["pool_label_key"],
            "label_value": local["pool_label_values"][pool],
            "taint_effect": effect[local["pool_taint_effect"]],
        }
        for pool in ("cpu", "gpu")
    }
    pipeline_side = {pool: {k: POOLS[pool][k] for k in ("label_key", "label_value", "taint_effect")} for pool in POOLS}
    assert pipeline_side == terraform_side


def test_bucket_uniform_access_versioning_and_lifecycle(parsed):
    bucket = _resources(parsed, "modules/storage", "google_storage_bucket")["artifacts"]
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    assert bucket["versioning"][0]["enabled"] is True
    prefixes = [rule["condition"][0].get("matches_prefix") for rule in bucket["lifecycle_rule"]]
    assert ["checkpoints/"] in prefixes


def test_cloud_sql_has_a_private_ip_only_and_backups(parsed):
    instance = _resources(parsed, "modules/database", "google_sql_database_instance")["mlflow"]
    settings = instance["settings"][0]
    ip = settings["ip_configuration"][0]
    assert ip["ipv4_enabled"] is False
    assert ip["private_network"] == "${var.network_id}"
    assert settings["backup_configuration"][0]["enabled"] is True
    assert _blocks(parsed, "modules/database", "variable")["database_version"]["default"].startswith("POSTGRES_")


def test_workload_identity_bindings_match_the_manifests_service_accounts(parsed):
    import yaml

    variables = _blocks(parsed, "modules/iam", "variable")
    base = ROOT / "manifests" / "base"
    pipeline_sa = yaml.safe_load((base / "pipeline" / "serviceaccount.yaml").read_text())["metadata"]
    mlflow_sa = yaml.safe_load((base / "mlflow" / "serviceaccount.yaml").read_text())["metadata"]
    assert variables["pipeline_ksa"]["default"] == {
        "namespace": pipeline_sa["namespace"],
        "name": pipeline_sa["name"],
    }
    assert variables["mlflow_ksa"]["default"] == {
        "namespace": mlflow_sa["namespace"],
        "name": mlflow_sa["name"],
    }
    bindings = _resources(parsed, "modules/iam", "google_service_account_iam_member")
    assert {b["role"] for b in bindings.values()} == {"roles/iam.workloadIdentityUser"}
    # No project-wide storage or owner/editor grants: bucket access is granted on the bucket only.
    project_roles = {b["role"] for b in _resources(parsed, "modules/iam", "google_project_iam_member").values()}
    assert not project_roles & {
        "roles/owner",
        "roles/editor",
        "roles/storage.admin",
        "roles/storage.objectAdmin",
    }


def test_infra_env_output_has_every_key_the_manifests_use(parsed):
    output = _blocks(parsed, "envs/dev", "output")["kubetune_infra_env"]["value"]
    keys_out = set(re.findall(r"^\s*([A-Z_]+)=", output, flags=re.M))
    example = (ROOT / "manifests" / "base" / "infra.env").read_text()
    keys_example = set(re.findall(r"^([A-Z_]+)=", example, flags=re.M))
    assert keys_out == keys_example


def test_checkov_terraform_is_clean():
    assert_clean(checkov(TF_ROOT, "terraform"))
