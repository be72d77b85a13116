"""The compiled pipeline's structure: task order, images, placement, GPU only on the GPU branch, retries,
caching, conditions, the Secret / ConfigMap references and no secret values, parameters and descriptions."""

from __future__ import annotations

import itertools

import pytest
import yaml

from components.params import PARAMS
from kubetune.errors import UserError
from pipelines import placement
from pipelines.sft_pipeline import CHECKPOINT_MOUNT, TRAIN_RETRY, compile_pipeline

STAGE_ORDER = [
    {"prepare", "prepare-fresh"},
    {"check-unchanged"},
    {"pack"},
    {"train-cpu", "train-gpu"},
    {"evaluate"},
    {"register"},
]
LEAVES = set().union(*STAGE_ORDER)
CPU_TASKS = LEAVES - {"train-gpu"}
HUB_TASKS = {"prepare", "prepare-fresh", "pack", "train-cpu", "train-gpu", "evaluate"}
MLFLOW_TASKS = {"check-unchanged", "register"}
DISPLAY = {
    "prepare": "Prepare data",
    "prepare-fresh": "Prepare data (fresh read)",
    "check-unchanged": "Check for new data",
    "pack": "Pack",
    "train-cpu": "Train on CPU (C3)",
    "train-gpu": "Train on GPU",
    "evaluate": "Evaluate",
    "register": "Register",
}


def tasks_by_path(spec: dict) -> dict[str, tuple[list[str], dict]]:
    """Every container task: (names of the DAG tasks from the root down to it, its task spec)."""
    found: dict[str, tuple[list[str], dict]] = {}

    def walk(dag: dict, path: list[str]) -> None:
        for name, task in dag["tasks"].items():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"], [*path, name])
            else:
                assert name not in found, f"task name {name} appears twice"
                found[name] = ([*path, name], task)

    walk(spec["root"]["dag"], [])
    return found


def dag_at(spec: dict, path: list[str]) -> dict:
    dag = spec["root"]["dag"]
    for name in path:
        dag = spec["components"][dag["tasks"][name]["componentRef"]["name"]]["dag"]
    return dag


def runs_before(spec: dict, a: str, b: str) -> bool:
    """Whether the compiled dependencies force task ``a`` to finish before task ``b`` starts."""
    leaves = tasks_by_path(spec)
    pa, pb = leaves[a][0], leaves[b][0]
    k = next(i for i, (x, y) in enumerate(zip(pa, pb, strict=False)) if x != y)
    dag = dag_at(spec, pa[:k])
    seen, todo = set(), [pb[k]]
    while todo:  # everything pb[k] transitively waits for, within the DAG where the two paths split
        for dep in dag["tasks"][todo.pop()].get("dependentTasks", []):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return pa[k] in seen


def executor(spec: dict, platform: dict, task: str) -> tuple[dict, dict]:
    name = f"exec-{task}"
    container = spec["deploymentSpec"]["executors"][name]["container"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][name]
    return container, k8s


def test_every_stage_is_a_task_with_a_display_name(spec):
    pipeline_spec, _ = spec
    leaves = tasks_by_path(pipeline_spec)
    assert set(leaves) == LEAVES
    assert {name: task["taskInfo"]["name"] for name, (_, task) in leaves.items()} == DISPLAY
    assert pipeline_spec["pipelineInfo"]["name"] == "kubetune-sft"


def test_task_order_is_forced_by_the_dependencies(spec):
    pipeline_spec, _ = spec
    for earlier, later in itertools.pairwise(STAGE_ORDER):
        for a in earlier:
            for b in later:
                assert runs_before(pipeline_spec, a, b), f"{a} does not run before {b}"
    assert not runs_before(pipeline_spec, "register", "prepare")


def test_branches_and_conditions(spec):
    pipeline_spec, _ = spec
    leaves = tasks_by_path(pipeline_spec)

    def conditions(task: str) -> list[str]:
        path = leaves[task][0]
        return [
            dag_at(pipeline_spec, path[:i])["tasks"][path[i]].get("triggerPolicy", {}).get("condition", "")
            for i in range(len(path) - 1)
        ]

    gate = "inputs.parameter_values['pipelinechannel--check-unchanged-Output'] != 'unchanged'"
    gpu = "inputs.parameter_values['pipelinechannel--accelerator'] == 'gpu'"
    fresh = "inputs.parameter_values['pipelinechannel--refresh_data'] == true"
    assert [c for c in conditions("train-gpu") if c] == [gate, gpu]
    assert [c for c in conditions("train-cpu") if c] == [gate, f"!({gpu})"]
    for task in ("pack", "evaluate", "register"):
        assert [c for c in conditions(task) if c] == [gate]
    assert [c for c in conditions("prepare-fresh") if c] == [fresh]
    assert [c for c in conditions("prepare") if c] == [f"!({fresh})"]
    assert [c for c in conditions("check-unchanged") if c] == []

    # dsl.OneOf: evaluate and register take the adapter of whichever train branch ran
    branches = pipeline_spec["components"]["comp-condition-branches-5"]["dag"]["outputs"]["artifacts"]
    (selectors,) = [o["artifactSelectors"] for o in branches.values()]
    assert {s["outputArtifactKey"] for s in selectors} == {
        "pipelinechannel--train-gpu-adapter",
        "pipelinechannel--train-cpu-adapter",
    }
    evaluate_inputs = leaves["evaluate"][1]["inputs"]["artifacts"]
    assert evaluate_inputs["adapter"]["taskOutputArtifact"]["producerTask"] == "condition-branches-5"


def test_images_per_task_and_no_pip_install(spec, images):
    pipeline_spec, platform = spec
    for task in LEAVES:
        container, _ = executor(pipeline_spec, platform, task)
        assert container["image"] == (images.gpu if task == "train-gpu" else images.cpu), task
        command = " ".join(container["command"])
        assert "pip install" not in command, task  # kfp is baked into the images
        assert "kfp.dsl.executor_main" in command


def test_placement_per_task(spec):
    pipeline_spec, platform = spec
    cpu = placement.POOLS["cpu"]
    gpu = placement.POOLS["gpu"]
    for task in CPU_TASKS:
        _, k8s = executor(pipeline_spec, platform, task)
        assert k8s["nodeSelector"] == {"labels": {"kubetune.io/pool": "cpu-c3"}}, task
        assert k8s["tolerations"] == [
            {"key": cpu["label_key"], "operator": "Equal", "value": "cpu-c3", "effect": "NoSchedule"}
        ], task
    _, k8s = executor(pipeline_spec, platform, "train-gpu")
    assert k8s["nodeSelector"] == {"labels": {"kubetune.io/pool": "gpu"}}
    assert {"key": gpu["label_key"], "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in k8s["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
    assert placement.taint("cpu") == "kubetune.io/pool=cpu-c3:NoSchedule"


def test_pod_labels_per_task(spec):
    """Every pod carries the role label MLflow's NetworkPolicy admits (tests/infra checks the policy side)."""
    pipeline_spec, platform = spec
    assert placement.POD_LABELS[placement.ROLE_LABEL[0]] == placement.ROLE_LABEL[1]
    for task in LEAVES:
        _, k8s = executor(pipeline_spec, platform, task)
        stage = "prepare" if task == "prepare-fresh" else task
        assert k8s["podMetadata"]["labels"] == {
            "app.kubernetes.io/part-of": "kubetune",
            "kubetune.io/role": "pipeline",
            "kubetune.io/stage": stage,
        }, task


def test_gpu_only_on_the_gpu_branch_and_resources_per_task(spec):
    pipeline_spec, platform = spec
    for task in LEAVES:
        container, _ = executor(pipeline_spec, platform, task)
        resources = container["resources"]
        wanted = placement.RESOURCES[task if task != "prepare-fresh" else "prepare"]
        assert resources["resourceCpuRequest"] == wanted["cpu_request"], task
        assert resources["resourceCpuLimit"] == wanted["cpu_limit"], task
        assert resources["resourceMemoryRequest"] == wanted["memory_request"], task
        assert resources["resourceMemoryLimit"] == wanted["memory_limit"], task
        if task == "train-gpu":
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "1"
        else:
            assert "accelerator" not in resources, task
    assert "nvidia" not in yaml.safe_dump({t: executor(pipeline_spec, platform, t) for t in CPU_TASKS}), (
        "a CPU task mentions a GPU"
    )


def test_retries_on_training_only(spec):
    pipeline_spec, _ = spec
    for name, (_, task) in tasks_by_path(pipeline_spec).items():
        if name.startswith("train-"):
            assert task["retryPolicy"] == {
                "maxRetryCount": TRAIN_RETRY["num_retries"],
                "backoffDuration": TRAIN_RETRY["backoff_duration"],
                "backoffFactor": TRAIN_RETRY["backoff_factor"],
                "backoffMaxDuration": "86400s",
            }, name
        else:
            assert "retryPolicy" not in task, name


def test_caching_on_prepare_and_pack_only(spec):
    pipeline_spec, _ = spec
    cached = {
        name
        for name, (_, task) in tasks_by_path(pipeline_spec).items()
        if task.get("cachingOptions", {}).get("enableCache")
    }
    assert cached == {
        "prepare",
        "pack",
    }  # the fresh-read prepare of recurring runs is never served from cache


def test_checkpoints_per_run_for_training(spec):
    pipeline_spec, _ = spec
    leaves = tasks_by_path(pipeline_spec)
    for task in ("train-cpu", "train-gpu"):
        params = leaves[task][1]["inputs"]["parameters"]
        assert params["run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
        assert params["checkpoint_root"] == {"componentInputParameter": "pipelinechannel--checkpoint_root"}


def test_secret_and_configmap_references_and_no_values(spec, compiled):
    pipeline_spec, platform = spec
    for task in LEAVES:
        _, k8s = executor(pipeline_spec, platform, task)
        assert k8s["configMapAsEnv"] == [
            {
                "configMapName": "kubetune-settings",
                "configMapNameParameter": {"runtimeValue": {"constant": "kubetune-settings"}},
                "keyToEnv": [{"configMapKey": "MLFLOW_TRACKING_URI", "envVar": "MLFLOW_TRACKING_URI"}],
                "optional": True,
            }
        ], task
        secrets = {ref["secretName"]: ref for ref in k8s.get("secretAsEnv", [])}
        wanted = {"hf-token"} if task in HUB_TASKS else set()
        wanted |= {"mlflow-client"} if task in MLFLOW_TASKS else set()
        assert set(secrets) == wanted, task
        if "hf-token" in secrets:
            assert secrets["hf-token"] == {
                "secretName": "hf-token",
                "secretNameParameter": {"runtimeValue": {"constant": "hf-token"}},
                "keyToEnv": [{"secretKey": "HF_TOKEN", "envVar": "HF_TOKEN"}],
                "optional": True,
            }, task
        if "mlflow-client" in secrets:
            assert secrets["mlflow-client"]["keyToEnv"] == [
                {"secretKey": "MLFLOW_TRACKING_USERNAME", "envVar": "MLFLOW_TRACKING_USERNAME"},
                {"secretKey": "MLFLOW_TRACKING_PASSWORD", "envVar": "MLFLOW_TRACKING_PASSWORD"},
            ], task
            assert secrets["mlflow-client"]["optional"] is True
        container, _ = executor(pipeline_spec, platform, task)
        assert "env" not in container, task  # no literal environment values at all


def test_compiling_reads_no_secret_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_sentinelSECRETvalue0123456789")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://sentinel-mlflow.invalid:5000")
    monkeypatch.setenv("KUBETUNE_KFP_TOKEN", "sentinel-bearer-token")
    text = compile_pipeline(tmp_path / "p.yaml").read_text()
    for sentinel in ("hf_sentinelSECRETvalue", "sentinel-mlflow", "sentinel-bearer-token"):
        assert sentinel not in text


def test_parameters_have_defaults_types_and_descriptions(spec):
    pipeline_spec, _ = spec
    inputs = pipeline_spec["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == {p.name for p in PARAMS}
    for p in PARAMS:
        assert inputs[p.name]["description"] == p.doc, p.name
        assert "defaultValue" in inputs[p.name], p.name  # submitting with no changes works
    assert inputs["accelerator"]["defaultValue"] == "cpu"
    assert inputs["method"]["defaultValue"] == "lora"
    assert inputs["lora_r"]["parameterType"] == "NUMBER_INTEGER"
    assert inputs["learning_rate"]["parameterType"] == "NUMBER_DOUBLE"
    assert inputs["force"]["parameterType"] == "BOOLEAN" and inputs["force"]["defaultValue"] is False
    assert inputs["overrides"]["parameterType"] == "LIST" and inputs["overrides"]["defaultValue"] == []
    # the components' own inputs carry the same descriptions
    train_inputs = pipeline_spec["components"]["comp-train-cpu"]["inputDefinitions"]["parameters"]
    assert train_inputs["lora_r"]["description"] == inputs["lora_r"]["description"]
    assert "pipeline run's id" in train_inputs["run_id"]["description"]


def test_checkpoint_pvc_is_mounted_on_the_train_tasks_only(tmp_path):
    text = compile_pipeline(
        tmp_path / "p.yaml", checkpoint_pvc="kubetune-checkpoints", checkpoint_gcsfuse=True
    ).read_text()
    pipeline_spec, platform = yaml.safe_load_all(text)
    for task in LEAVES:
        _, k8s = executor(pipeline_spec, platform, task)
        annotations = k8s.get("podMetadata", {}).get("annotations", {})
        if task.startswith("train-"):
            assert k8s["pvcMount"] == [
                {
                    "mountPath": CHECKPOINT_MOUNT,
                    "pvcNameParameter": {"runtimeValue": {"constant": "kubetune-checkpoints"}},
                    "constant": "kubetune-checkpoints",
                }
            ], task
            assert annotations == {"gke-gcsfuse/volumes": "true"}, task
        else:
            assert "pvcMount" not in k8s and annotations == {}, task
    inputs = pipeline_spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["checkpoint_root"]["defaultValue"] == CHECKPOINT_MOUNT
    with pytest.raises(UserError, match="--checkpoint-gcsfuse needs --checkpoint-pvc"):
        compile_pipeline(tmp_path / "q.yaml", checkpoint_gcsfuse=True)


def test_compilation_is_deterministic(compiled, tmp_path, images):
    again = compile_pipeline(tmp_path / "again.yaml", images)
    assert again.read_text() == compiled.read_text()


def test_train_nodes_is_a_run_parameter_that_reaches_both_train_tasks(spec, images):
    pipeline_spec, _ = spec
    inputs = pipeline_spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["train_nodes"]["parameterType"] == "NUMBER_INTEGER"
    assert inputs["train_nodes"]["defaultValue"] == 1  # one node: the train task trains in its own pod, as before
    leaves = tasks_by_path(pipeline_spec)
    for task, pool, image in (("train-cpu", "cpu", images.cpu), ("train-gpu", "gpu", images.gpu)):
        params = leaves[task][1]["inputs"]["parameters"]
        assert params["train_nodes"] == {"componentInputParameter": "pipelinechannel--train_nodes"}, task
        # what the task hands to its TrainJob: its own pool and image, the checkpoint claim (none compiled here)
        assert params["train_pool"] == {"runtimeValue": {"constant": pool}}, task
        assert params["train_image"] == {"runtimeValue": {"constant": image}}, task
        assert params["checkpoint_pvc"] == {"runtimeValue": {"constant": ""}}, task
        assert params["checkpoint_gcsfuse"] == {"runtimeValue": {"constant": False}}, task
        component = pipeline_spec["components"][leaves[task][1]["componentRef"]["name"]]
        described = component["inputDefinitions"]["parameters"]
        assert described["train_nodes"]["description"] == inputs["train_nodes"]["description"]
        assert "TrainJob" in described["train_image"]["description"]
    for name, (_, task) in leaves.items():
        if not name.startswith("train-"):
            assert "train_nodes" not in task.get("inputs", {}).get("parameters", {}), name


def test_the_train_tasks_know_the_checkpoint_claim_they_mount(tmp_path):
    text = compile_pipeline(
        tmp_path / "p.yaml", checkpoint_pvc="kubetune-checkpoints", checkpoint_gcsfuse=True
    ).read_text()
    pipeline_spec, _ = yaml.safe_load_all(text)
    leaves = tasks_by_path(pipeline_spec)
    for task in ("train-cpu", "train-gpu"):
        params = leaves[task][1]["inputs"]["parameters"]
        assert params["checkpoint_pvc"] == {"runtimeValue": {"constant": "kubetune-checkpoints"}}, task
        assert params["checkpoint_gcsfuse"] == {"runtimeValue": {"constant": True}}, task
