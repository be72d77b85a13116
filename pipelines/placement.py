"""Where each pipeline task runs: the pipeline side of the placement contract, defined once.

Terraform's node pools carry the same label and taint (label ``kubetune.io/pool=<value>``, taint
``kubetune.io/pool=<value>:NoSchedule``); a test checks that the two sides agree. A task lands on a pool
through a node selector on the label plus a toleration of the taint, so nothing else schedules onto these
pools by accident and no kubetune task lands anywhere else.

Requests and limits are sized for the presets on the nodes Terraform creates by default: c3-standard-22
(22 vCPU, 88 GB; about 21.8 vCPU / 75 GiB allocatable) in the CPU pool and g2-standard-8 (one NVIDIA L4, 8
vCPU, 32 GB) in the GPU pool; other GPU profiles (A100, H100) are larger. Training asks for most of a node
with requests equal to limits (Guaranteed QoS: the pod is the last to be evicted under memory pressure, and
with the static CPU manager it gets whole cores, which is what AMX matmuls want); the light steps ask for
little so that they share nodes. A smaller CPU machine type needs smaller numbers for train-cpu here.
"""

from __future__ import annotations

from typing import Any

# Where, and as whom, the pipeline's pods run: the pipeline side of the contract with manifests/ and terraform/
# (tests/infra/test_pipeline_contract.py reads both sides). KFP standalone runs every pod of a run in its own
# namespace. `submit` and `schedule` run as SERVICE_ACCOUNT (manifests/base/pipeline, Workload Identity to the
# artifacts bucket); a run started from the KFP UI with the form's service account left empty runs as KFP's
# default runner, which Terraform also lets into the bucket (the checkpoint volume is a GCS FUSE mount of it).
RUN_NAMESPACE = "kubeflow"
SERVICE_ACCOUNT = "kubetune-pipeline"
KFP_DEFAULT_SERVICE_ACCOUNT = "pipeline-runner"
# Labels on every task's pod. MLflow's NetworkPolicy admits pods with ROLE_LABEL from RUN_NAMESPACE, and
# nothing else in that namespace; STAGE_LABEL_KEY (value: the task's stage) is added per task.
ROLE_LABEL = ("kubetune.io/role", "pipeline")
POD_LABELS: dict[str, str] = {"app.kubernetes.io/part-of": "kubetune", ROLE_LABEL[0]: ROLE_LABEL[1]}
STAGE_LABEL_KEY = "kubetune.io/stage"

POOL_LABEL_KEY = "kubetune.io/pool"

POOLS: dict[str, dict[str, str]] = {
    "cpu": {"label_key": POOL_LABEL_KEY, "label_value": "cpu-c3", "taint_effect": "NoSchedule"},
    "gpu": {"label_key": POOL_LABEL_KEY, "label_value": "gpu", "taint_effect": "NoSchedule"},
}

# Multi-node training (train_nodes > 1) runs as a Kubeflow Trainer TrainJob on the same pools. Each pool has one
# kubetune ClusterTrainingRuntime (manifests/trainer), named here: CPU (C3, torch.distributed over gloo) and GPU
# (NCCL). The TrainJob refers to it by name; a test checks that the manifests ship these names.
TRAINING_RUNTIMES: dict[str, str] = {"cpu": "kubetune-torch-cpu", "gpu": "kubetune-torch-gpu"}
TRAINJOB_CONTAINER = "node"  # the torch runtime's trainer container (replicated job "node")

# What the train pods get besides placement, shared by the single-node train task (pipelines/sft_pipeline.py) and
# the TrainJob's pods (pipelines/trainjob.py). Secrets never enter a spec: Kubernetes resolves these references
# when a pod starts.
HF_SECRET = ("hf-token", "HF_TOKEN")  # Secret name, key (exposed to the pod as env HF_TOKEN)
SETTINGS_CONFIGMAP = ("kubetune-settings", "MLFLOW_TRACKING_URI")  # ConfigMap name, key (same env name)
GCSFUSE_ANNOTATION = ("gke-gcsfuse/volumes", "true")  # GKE injects the GCS FUSE sidecar into such pods
CHECKPOINT_MOUNT = "/mnt/kubetune-checkpoints"  # where --checkpoint-pvc is mounted in the train pods

# The GPU the train-on-GPU task asks for. KFP turns the accelerator type into the container's resource limit
# name (limits: {nvidia.com/gpu: 1}), so the type is the device plugin's resource name, not a GPU model: which
# GPU (L4 by default) is the GPU pool's business, and the pool label already selects it.
GPU_RESOURCE = "nvidia.com/gpu"
GPU_COUNT = 1

# Per task: CPU / memory requests and limits (Kubernetes quantities).
RESOURCES: dict[str, dict[str, str]] = {
    "prepare": {"cpu_request": "1", "cpu_limit": "2", "memory_request": "4Gi", "memory_limit": "8Gi"},
    "check-unchanged": {
        "cpu_request": "500m",
        "cpu_limit": "1",
        "memory_request": "1Gi",
        "memory_limit": "2Gi",
    },
    "pack": {"cpu_request": "2", "cpu_limit": "4", "memory_request": "8Gi", "memory_limit": "16Gi"},
    "train-cpu": {"cpu_request": "20", "cpu_limit": "20", "memory_request": "64Gi", "memory_limit": "64Gi"},
    "train-gpu": {"cpu_request": "6", "cpu_limit": "6", "memory_request": "24Gi", "memory_limit": "24Gi"},
    "evaluate": {"cpu_request": "8", "cpu_limit": "8", "memory_request": "24Gi", "memory_limit": "24Gi"},
    "register": {"cpu_request": "500m", "cpu_limit": "1", "memory_request": "2Gi", "memory_limit": "4Gi"},
}


def taint(pool: str) -> str:
    """The taint the pool's nodes carry, as ``kubectl taint`` writes it: ``key=value:Effect``."""
    p = POOLS[pool]
    return f"{p['label_key']}={p['label_value']}:{p['taint_effect']}"


def node_selector(pool: str) -> dict[str, str]:
    """The node selector that puts a pod on ``pool``: ``{kubetune.io/pool: <value>}``."""
    p = POOLS[pool]
    return {p["label_key"]: p["label_value"]}


def tolerations(pool: str) -> list[dict[str, str]]:
    """The tolerations a pod on ``pool`` needs: the pool taint, and on the GPU pool GKE's GPU taint too (GKE taints
    GPU nodes nvidia.com/gpu=present:NoSchedule; tolerated explicitly rather than relying on the
    ExtendedResourceToleration admission plugin being on)."""
    p = POOLS[pool]
    out = [{"key": p["label_key"], "operator": "Equal", "value": p["label_value"], "effect": p["taint_effect"]}]
    if pool == "gpu":
        out.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return out


def on_pool(task: Any, pool: str) -> Any:
    """Pin ``task`` to ``pool``: :func:`node_selector` and :func:`tolerations`."""
    from kfp import kubernetes

    for key, value in node_selector(pool).items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in tolerations(pool):
        kubernetes.add_toleration(task, **toleration)
    return task


def on_gpu(task: Any) -> Any:
    """GPU pool and one GPU: pool selector, the pool's tolerations (GKE's GPU taint among them), the GPU limit."""
    on_pool(task, "gpu")
    task.set_accelerator_type(GPU_RESOURCE)
    task.set_accelerator_limit(GPU_COUNT)
    return task


def label(task: Any, stage: str) -> Any:
    """Put :data:`POD_LABELS` and ``kubetune.io/stage=<stage>`` on the task's pod."""
    from kfp import kubernetes

    for key, value in {**POD_LABELS, STAGE_LABEL_KEY: stage}.items():
        kubernetes.add_pod_label(task, key, value)
    return task


def size(task: Any, stage: str) -> Any:
    """Apply the CPU / memory requests and limits of ``stage`` (a key of :data:`RESOURCES`)."""
    r = RESOURCES[stage]
    task.set_cpu_request(r["cpu_request"]).set_cpu_limit(r["cpu_limit"])
    task.set_memory_request(r["memory_request"]).set_memory_limit(r["memory_limit"])
    return task
