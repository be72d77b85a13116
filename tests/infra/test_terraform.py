"""Terraform: formatting, every file parses, checkov is clean, and the modules say what the design says.

``terraform validate`` needs the providers, which cannot be downloaded here, so files are parsed with
python-hcl2 and the structure (pools, autoscaling, taints, typed and described variables) is asserted on the
parse tree.
"""

from __future__ import annotations

import json
import os
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


def _pools(parsed) -> dict[str, dict]:
    """Each pool's entry of local.pools as the resource sees it: local.pool_defaults merged with its spec."""
    local = _placement_locals(parsed)
    return {key: {**local["pool_defaults"], **spec} for key, spec in local["pool_specs"].items()}


def test_one_node_pool_resource_for_each_over_the_pools(parsed):
    resources = _resources(parsed, "modules/node_pools", "google_container_node_pool")
    assert set(resources) == {"this"}, "node pools are one resource driven by local.pools, not copies"
    pool = resources["this"]
    assert pool["for_each"] == "${local.pools}"
    local = _placement_locals(parsed)
    assert local["pools"] == "${{for key, spec in local.pool_specs : key => merge(local.pool_defaults, spec)}}"
    assert set(local["pool_specs"]) == {"system", "cpu", "gpu"}
    # Every attribute the resource reads from a pool has a default, so no pool can lack one.
    read = set(re.findall(r"each\.value\.(\w+)", json.dumps(pool)))
    assert read <= set(local["pool_defaults"]) | {"name", "machine_type", "label_value"}
    for key, spec in local["pool_specs"].items():
        assert {"name", "machine_type", "label_value"} <= set(spec), key
        assert set(spec) <= set(local["pool_defaults"]) | {"name", "machine_type", "label_value"}, key
    # The GKE pool names stay what they were (outputs, kubectl and the console show them).
    assert {k: v["name"] for k, v in local["pool_specs"].items()} == {"system": "system", "cpu": "cpu-c3", "gpu": "gpu"}
    dynamic = {name for block in pool["node_config"][0]["dynamic"] for name in block}
    assert dynamic == {"taint", "guest_accelerator", "gcfs_config", "gvnic"}
    assert {name for block in pool["dynamic"] for name in block} == {"placement_policy", "network_config"}


def test_moved_blocks_cover_every_old_pool_address(parsed):
    moved = [
        block
        for path, tree in parsed.items()
        if path.parent == TF_ROOT.relative_to(ROOT) / "modules" / "node_pools"
        for block in tree.get("moved", [])
    ]
    assert sorted((m["from"], m["to"]) for m in moved) == sorted(
        (f"${{google_container_node_pool.{key}}}", f'${{google_container_node_pool.this["{key}"]}}')
        for key in ("system", "cpu", "gpu")
    )


def test_c3_and_gpu_pools_scale_from_zero_with_labels_and_taints_from_the_contract(parsed):
    pool = _resources(parsed, "modules/node_pools", "google_container_node_pool")["this"]
    pools = _pools(parsed)
    scaling = pool["autoscaling"][0]
    assert scaling["total_min_node_count"] == "${each.value.per_zone_limits ? null : each.value.min_nodes}"
    assert scaling["min_node_count"] == "${each.value.per_zone_limits ? each.value.min_nodes : null}"
    assert pool["initial_node_count"] == "${each.value.min_nodes}"
    node = pool["node_config"][0]
    assert node["labels"] == {"${(local.pool_label_key)}": "${each.value.label_value}"}
    taint = next(block["taint"] for block in node["dynamic"] if "taint" in block)
    assert taint["for_each"] == "${each.value.taint_value == null ? [] : [each.value.taint_value]}"
    assert taint["content"] == [
        {"key": "${local.pool_label_key}", "value": "${taint.value}", "effect": "${local.pool_taint_effect}"}
    ]
    assert node["spot"] == "${each.value.spot}"
    assert node["workload_metadata_config"][0]["mode"] == "GKE_METADATA"
    assert node["shielded_instance_config"][0]["enable_secure_boot"] is True
    for name in ("cpu", "gpu"):
        spec = pools[name]
        assert spec["min_nodes"] == 0 and spec["per_zone_limits"] is False, f"{name} pool must scale from zero"
        assert spec["label_value"] == f"${{local.pool_label_values.{name}}}"
        assert spec["taint_value"] == f"${{local.pool_label_values.{name}}}"
        assert spec["spot"] == f"${{var.{name}_spot}}"
        assert spec["image_streaming"] is True
    # Only the system pool has no taint, and it never scales to zero (kube-system, KFP, MLflow live there).
    assert pools["system"]["taint_value"] is None
    assert pools["system"]["label_value"] == "${local.pool_label_values.system}"
    assert pools["system"]["min_nodes"] >= 1 and pools["system"]["per_zone_limits"] is True


_TFVARS = (
    'project_id = "p"\ncluster_id = "projects/p/locations/r/clusters/c"\n'
    'location = "us-central1"\nnode_service_account = "n@p.iam.gserviceaccount.com"\n'
)

# The pools' addresses before they became one resource, as terraform_data stand-ins with each pool's GKE name.
_OLD_POOLS = "".join(
    f'resource "terraform_data" "{key}" {{\n  input = "{name}"\n}}\n'
    for key, name in (("system", "system"), ("cpu", "cpu-c3"), ("gpu", "gpu"))
)


def _preconditions(body: str) -> str:
    """The ``precondition { ... }`` blocks of a resource body, verbatim."""
    blocks = []
    for match in re.finditer(r"^(\s*)precondition \{\n", body, flags=re.M):
        end = body.index(f"\n{match.group(1)}}}", match.end()) + len(match.group(1)) + 2
        blocks.append(body[match.start() : end] + "\n")
    return "".join(blocks)


def _stand_in(main_tf: str) -> str:
    """``main_tf`` with every google_container_node_pool replaced by a terraform_data of the same address
    (name and for_each) whose input is the pool's name and which keeps the pool's preconditions; locals and moved
    blocks stay, retyped."""
    out, last = [], 0
    for match in re.finditer(r'^resource "google_container_node_pool" "(\w+)" \{\n', main_tf, flags=re.M):
        depth, end = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(main_tf[end], 0)
            end += 1
        body = main_tf[match.end() : end]
        for_each = re.search(r"^  for_each = (.+)$", body, flags=re.M)
        name = re.search(r"^  name\s+= (.+)$", body, flags=re.M).group(1)
        out.append(main_tf[last : match.start()])
        out.append(f'resource "terraform_data" "{match.group(1)}" {{\n')
        out.append(f"  for_each = {for_each.group(1)}\n" if for_each else "")
        out.append(f"  input = {name}\n")
        preconditions = _preconditions(body)
        out.append(f"  lifecycle {{\n{preconditions}  }}\n}}\n" if preconditions else "}\n")
        last = end
    out.append(main_tf[last:])
    return "".join(out).replace("google_container_node_pool.", "terraform_data.")


def test_pool_addresses_move_without_destroying_anything(tmp_path):
    """A plan of the pools with terraform_data stand-ins: the old three resources in a local state, then the new
    resource and its moved blocks. The google provider cannot be downloaded here; terraform_data is built in.
    Each stand-in keeps its resource's address (name, for_each) and takes the pool's GKE name as input."""
    exe = binary("terraform")
    module = TF_ROOT / "modules" / "node_pools"
    env = {**os.environ, "TF_CLI_CONFIG_FILE": os.devnull, "TF_IN_AUTOMATION": "1"}
    tfvars = tmp_path / "test.tfvars"
    tfvars.write_text(_TFVARS + 'training_zone = "us-central1-a"\n')
    state = tmp_path / "terraform.tfstate"
    plans = {}
    for step, main in (("old", _OLD_POOLS), ("new", _stand_in((module / "main.tf").read_text()))):
        folder = tmp_path / step
        folder.mkdir()
        (folder / "main.tf").write_text(main)
        for name in ("variables.tf", "placement.tf"):
            (folder / name).write_text((module / name).read_text())
        init = run([exe, f"-chdir={folder}", "init", "-input=false", "-no-color"], env=env)
        assert init.returncode == 0, init.stdout + init.stderr
        verb = ["apply", "-auto-approve"] if step == "old" else ["plan"]
        done = run(
            [exe, f"-chdir={folder}", *verb, "-input=false", "-no-color", f"-var-file={tfvars}", f"-state={state}"],
            env=env,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        plans[step] = done.stdout
    assert "Resources: 3 added" in plans["old"]
    assert "Plan: 0 to add, 0 to change, 0 to destroy." in plans["new"]
    for key in ("system", "cpu", "gpu"):
        assert f'terraform_data.{key} has moved to terraform_data.this["{key}"]' in plans["new"]


def test_training_pools_are_compact_in_one_zone_with_gvnic_and_sized_for_multi_node_runs(parsed):
    pool = _resources(parsed, "modules/node_pools", "google_container_node_pool")["this"]
    pools = _pools(parsed)
    local = _placement_locals(parsed)
    assert pool["node_locations"] == "${each.value.node_locations}"
    placement = next(b["placement_policy"] for b in pool["dynamic"] if "placement_policy" in b)
    assert placement["content"] == [{"type": "${placement_policy.value}"}]
    assert local["training_placement"] == '${var.compact_placement ? "COMPACT" : null}'
    assert local["training_locations"] == "${var.compact_placement ? [var.training_zone] : null}"
    gvnic = next(b["gvnic"] for b in pool["node_config"][0]["dynamic"] if "gvnic" in b)
    assert gvnic["for_each"] == "${each.value.gvnic ? [true] : []}" and gvnic["content"] == [{"enabled": True}]
    network = next(b["network_config"] for b in pool["dynamic"] if "network_config" in b)
    tier = network["content"][0]["network_performance_config"][0]["total_egress_bandwidth_tier"]
    assert tier == "${network_config.value}"
    for name in ("cpu", "gpu"):
        assert pools[name]["placement_policy"] == "${local.training_placement}", name
        assert pools[name]["node_locations"] == "${local.training_locations}", name
        assert pools[name]["gvnic"] is True, name
    assert pools["cpu"]["network_tier"] == '${var.cpu_network_tier == "TIER_1" ? "TIER_1" : null}'
    assert pools["gpu"]["network_tier"] is None, "Tier_1 is a C3/N2/C2 feature, not G2/A2/A3"
    assert pools["system"]["placement_policy"] is None and pools["system"]["node_locations"] is None
    variables = _blocks(parsed, "modules/node_pools", "variable")
    assert variables["compact_placement"]["default"] is True
    assert variables["cpu_network_tier"]["default"] == "DEFAULT"
    # A TrainJob of N nodes needs N nodes of its pool at once: the ceilings fit the largest runs tested (8).
    assert variables["cpu_max_nodes"]["default"] >= 8 and variables["gpu_max_nodes"]["default"] >= 8
    env = _blocks(parsed, "envs/dev", "variable")
    for name in ("cpu_max_nodes", "gpu_max_nodes", "compact_placement", "cpu_network_tier"):
        assert env[name]["default"] == variables[name]["default"], name
    wiring = _blocks(parsed, "envs/dev", "module")["node_pools"]
    assert {"compact_placement", "training_zone", "cpu_network_tier"} <= set(wiring)


@pytest.fixture(scope="module")
def pools_stand_in(tmp_path_factory):
    """The node_pools module with its pool resource replaced by terraform_data (preconditions kept), initialised."""
    exe = binary("terraform")
    module = TF_ROOT / "modules" / "node_pools"
    folder = tmp_path_factory.mktemp("pools")
    (folder / "main.tf").write_text(_stand_in((module / "main.tf").read_text()))
    for name in ("variables.tf", "placement.tf"):
        (folder / name).write_text((module / name).read_text())
    env = {**os.environ, "TF_CLI_CONFIG_FILE": os.devnull, "TF_IN_AUTOMATION": "1"}
    init = run([exe, f"-chdir={folder}", "init", "-input=false", "-no-color"], env=env)
    assert init.returncode == 0, init.stdout + init.stderr
    (folder / "test.tfvars").write_text(_TFVARS)

    def plan(*variables: str):
        args = [f"-var={v}" for v in variables]
        return run(
            [exe, f"-chdir={folder}", "plan", "-input=false", "-no-color", "-var-file=test.tfvars", *args],
            env=env,
        )

    return plan


# (variables, the one-line error expected, or None when the plan must pass)
PLACEMENT_CASES = [
    (["training_zone=us-central1-a"], None),
    (["compact_placement=false"], None),
    ([], "set training_zone to a zone of us-central1"),
    (["training_zone=europe-west4-a"], "set training_zone to a zone of us-central1"),
    (["training_zone=us-central1-a", "cpu_max_nodes=151"], "at most 150 nodes"),
    (["training_zone=us-central1-a", "cpu_network_tier=TIER_1"], "at least 30 vCPUs"),
    (["training_zone=us-central1-a", "cpu_network_tier=TIER_1", "cpu_machine_type=c3-standard-44"], None),
    (["training_zone=us-central1-a", "cpu_network_tier=TIER_2"], "cpu_network_tier must be DEFAULT or TIER_1"),
]


@pytest.mark.parametrize(
    "variables, error", PLACEMENT_CASES, ids=[" ".join(c[0]) or "defaults" for c in PLACEMENT_CASES]
)
def test_plan_refuses_placement_and_network_settings_gke_does_not_support(pools_stand_in, variables, error):
    result = pools_stand_in(*variables)
    output = " ".join((result.stdout + result.stderr).split())
    if error is None:
        assert result.returncode == 0, output
    else:
        assert result.returncode != 0 and error in output, output


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
    pool = _resources(parsed, "modules/node_pools", "google_container_node_pool")["this"]
    dynamic = next(b["guest_accelerator"] for b in pool["node_config"][0]["dynamic"] if "guest_accelerator" in b)
    accel = dynamic["content"][0]
    assert accel["type"] == "${guest_accelerator.value.type}"
    assert accel["count"] == "${guest_accelerator.value.count}"
    pools = _pools(parsed)
    assert pools["gpu"]["accelerator"] == {"type": "${local.gpu.accelerator}", "count": "${local.gpu.count}"}
    assert pools["gpu"]["machine_type"] == "${local.gpu.machine_type}"
    assert pools["cpu"]["accelerator"] is None and pools["system"]["accelerator"] is None
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
    project_grants = _resources(parsed, "modules/iam", "google_project_iam_member")
    assert set(project_grants) == {"this"} and project_grants["this"]["role"] == "${each.value.role}"
    project_roles = {grant["role"] for grant in project_grants["this"]["for_each"].values()}
    assert project_roles == {
        "roles/container.defaultNodeServiceAccount",
        "roles/cloudsql.client",
        "roles/logging.logWriter",
    }
    repository = _resources(parsed, "modules/iam", "google_artifact_registry_repository_iam_member")["this"]
    assert repository["for_each"] == {
        "nodes_pull": {"role": "roles/artifactregistry.reader", "member": "${google_service_account.nodes.member}"},
        "build_push": {"role": "roles/artifactregistry.writer", "member": "${google_service_account.build.member}"},
    }
    moved = sorted(
        (block["from"], block["to"])
        for path, tree in parsed.items()
        if path.parent == TF_ROOT.relative_to(ROOT) / "modules" / "iam"
        for block in tree.get("moved", [])
    )
    # Every address these grants had when each was a resource of its own moves to its for_each key.
    old_addresses = [
        ("google_project_iam_member", "nodes_default"),
        ("google_project_iam_member", "mlflow_cloudsql_client"),
        ("google_project_iam_member", "build_logs"),
        ("google_artifact_registry_repository_iam_member", "nodes_pull"),
        ("google_artifact_registry_repository_iam_member", "build_push"),
    ]
    assert moved == sorted((f"${{{rtype}.{key}}}", f'${{{rtype}.this["{key}"]}}') for rtype, key in old_addresses)
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
