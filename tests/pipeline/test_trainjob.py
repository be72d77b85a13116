"""The TrainJob of a multi-node run (pipelines/trainjob.py): the object, checked against the Trainer v2.3 API models
and field by field against pipelines/placement.py, and the submit / wait / cleanup path against the fake Kubernetes
API in conftest.py (successful, failed, preempted and timed-out jobs, SIGTERM to the task, 409 and 5xx answers)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

from kubetune import artifacts
from kubetune.checkpoints import PREEMPTED_FILE
from kubetune.config import Config, load
from kubetune.errors import EXIT_PREEMPTED, Preempted, UserError
from pipelines import placement, trainjob

from .conftest import OWN_POD, FakeKube

IMAGE = "registry.example.com/team/kubetune-cpu:1.2.3"
RUN_ID = "6b1f2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
CLAIM = "kubetune-checkpoints"
FAST = {"backoff_s": 0.01, "attempts": 4, "request_timeout_s": 10.0}
POLL = 0.05


def built(nodes: int, pool: str, **kw) -> dict:
    owner = trainjob.Owner(OWN_POD["KFP_POD_NAME"], OWN_POD["KFP_POD_UID"], "kubetune-pipeline")
    args = {
        "name": trainjob.job_name(RUN_ID, owner.attempt),
        "image": IMAGE,
        "checkpoint_pvc": CLAIM,
        "work_dir": f"{placement.CHECKPOINT_MOUNT}/{RUN_ID}/trainjob",
        "owner": owner,
        "run_id": RUN_ID,
        **kw,
    }
    return trainjob.build(nodes, pool, **args)


# --- the object ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["cpu", "gpu"])
@pytest.mark.parametrize("nodes", [1, 2, 8])
def test_the_trainjob_is_a_valid_trainer_object_placed_as_the_single_node_task(nodes, pool):
    obj = built(nodes, pool, checkpoint_gcsfuse=True)
    model = TrainerV1alpha1TrainJob.from_dict(obj)
    assert model.to_dict() == obj  # nothing the Trainer v2.3 API lacks
    assert model.spec.trainer.num_nodes == nodes and model.spec.runtime_ref.name == placement.TRAINING_RUNTIMES[pool]

    assert obj["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and obj["kind"] == "TrainJob"
    meta = obj["metadata"]
    assert meta["name"] == f"kubetune-{RUN_ID}-3f5e2a10" and len(meta["name"]) <= 63
    assert meta["namespace"] == placement.RUN_NAMESPACE
    assert meta["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": OWN_POD["KFP_POD_NAME"], "uid": OWN_POD["KFP_POD_UID"]}
    ]
    assert meta["labels"] == {
        **placement.POD_LABELS,
        placement.STAGE_LABEL_KEY: f"train-{pool}",
        "kubetune.io/run-id": RUN_ID,
        "kubetune.io/attempt": "3f5e2a10",
    }
    spec = obj["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": placement.TRAINING_RUNTIMES[pool],
    }
    assert spec["activeDeadlineSeconds"] == trainjob.DEADLINE_S
    trainer = spec["trainer"]
    assert trainer["image"] == IMAGE
    assert trainer["numNodes"] == nodes and trainer["numProcPerNode"] == 1
    r = placement.RESOURCES[f"train-{pool}"]
    limits = {"cpu": r["cpu_limit"], "memory": r["memory_limit"]}
    if pool == "gpu":
        limits["nvidia.com/gpu"] = "1"
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": r["cpu_request"], "memory": r["memory_request"]},
        "limits": limits,
    }
    work = f"{placement.CHECKPOINT_MOUNT}/{RUN_ID}/trainjob"
    assert trainer["command"] == [
        "torchrun",
        "--no-python",
        "kubetune",
        "train",
        "--config",
        f"{work}/config.yaml",
        "--packed",
        f"{work}/packed",
        "--out",
        f"{work}/adapter",
    ]
    env = {e["name"]: e for e in trainer["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN", "optional": True}}
    assert not any(name.startswith("PET_") for name in env)  # Trainer's torch runtime sets those

    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == "kubetune.io/pipeline"
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == placement.TRAINJOB_CONTAINER
    pod = job["template"]["spec"]["template"]
    assert pod["metadata"]["labels"] == {**placement.POD_LABELS, placement.STAGE_LABEL_KEY: f"train-{pool}"}
    assert pod["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
    pool_def = placement.POOLS[pool]
    assert pod["spec"]["nodeSelector"] == {pool_def["label_key"]: pool_def["label_value"]}
    taint = {
        "key": pool_def["label_key"],
        "operator": "Equal",
        "value": pool_def["label_value"],
        "effect": "NoSchedule",
    }
    gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert pod["spec"]["tolerations"] == ([taint, gpu_taint] if pool == "gpu" else [taint])
    assert pod["spec"]["serviceAccountName"] == "kubetune-pipeline"
    assert pod["spec"]["volumes"] == [{"name": "kubetune-checkpoints", "persistentVolumeClaim": {"claimName": CLAIM}}]
    assert pod["spec"]["containers"] == [
        {"name": "node", "volumeMounts": [{"name": "kubetune-checkpoints", "mountPath": placement.CHECKPOINT_MOUNT}]}
    ]


def test_no_gcsfuse_annotation_without_gcsfuse_and_no_gpu_on_the_cpu_pool():
    obj = built(2, "cpu")
    pod = obj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert "annotations" not in pod["template"]["spec"]["template"]["metadata"]
    assert "nvidia" not in json.dumps(obj)


def test_validation_refuses_what_the_trainer_api_lacks_or_mistypes():
    obj = built(2, "cpu")
    obj["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(ValueError, match=r"not a valid Trainer v2\.3 TrainJob"):
        trainjob.validate(obj)
    obj = built(2, "cpu")
    obj["spec"]["trainer"]["numGPUs"] = 1  # no such field: the models would drop it silently
    with pytest.raises(ValueError, match=r"lacks or changes: spec\.trainer\.numGPUs"):
        trainjob.validate(obj)


def test_names_are_dns_labels_and_deterministic():
    assert trainjob.job_name(RUN_ID, "3f5e2a10") == f"kubetune-{RUN_ID}-3f5e2a10"
    assert trainjob.job_name(RUN_ID, "3f5e2a10") != trainjob.job_name(RUN_ID, "77aa0011")
    for run_id in ("Run_With.Odd/Chars", "x" * 200, "--", RUN_ID.upper()):
        name = trainjob.job_name(run_id, "3f5e2a10")
        assert len(name) <= 63 and trainjob._DNS_LABEL.match(name), name
        assert name == trainjob.job_name(run_id, "3f5e2a10")
    assert trainjob.job_name("a.b", "1") != trainjob.job_name("a-b", "1")  # cleaned names keep apart
    with pytest.raises(ValueError, match="RFC 1035"):
        built(2, "cpu", name="Not_A_Label")


@pytest.mark.parametrize("nodes", [0, -1, True, "2", 1.5, None])
def test_a_bad_node_count_is_refused_in_one_line(nodes):
    with pytest.raises(UserError, match="pipeline parameter `train_nodes`") as err:
        trainjob.check_nodes(nodes)
    assert "\n" not in str(err.value)


def test_multi_node_needs_the_shared_checkpoint_volume():
    ok = {
        "pool": "cpu",
        "image": IMAGE,
        "checkpoint_pvc": CLAIM,
        "checkpoint_dir": f"/mnt/kubetune-checkpoints/{RUN_ID}",
    }
    assert trainjob.check(2, **ok) == 2
    assert trainjob.check(1, **{**ok, "checkpoint_pvc": "", "checkpoint_dir": None}) == 1  # one node: as before
    assert trainjob.check(2.0, **ok) == 2
    cases = [
        ({"checkpoint_pvc": ""}, "compiled without one; compile with --checkpoint-pvc"),
        ({"checkpoint_dir": None}, "pipeline parameter `checkpoint_root`: empty"),
        ({"checkpoint_dir": f"/data/ckpt/{RUN_ID}"}, "'/data/ckpt' is not on the checkpoint volume"),
        ({"checkpoint_dir": f"/mnt/kubetune-checkpoints-other/{RUN_ID}"}, "is not on the checkpoint volume"),
        ({"image": "Not An Image"}, "train image 'Not An Image': not an image reference"),
        ({"pool": "tpu"}, "train pool 'tpu'"),
    ]
    for change, message in cases:
        with pytest.raises(UserError, match=message) as err:
            trainjob.check(2, **{**ok, **change})
        assert "\n" not in str(err.value)


# --- submit / wait / cleanup against the fake API --------------------------------------------------------------


@pytest.fixture
def inputs(tmp_path):
    """A config whose checkpoint folder is on the (stand-in) checkpoint mount, a packed dataset, an output path."""
    mount = tmp_path / "mnt"
    cfg = Config().replace(**{"model.name_or_path": "org/model", "train.checkpoint_dir": str(mount / RUN_ID)})
    packed = tmp_path / "packed"
    with artifacts.stage_output(packed, "pack", "f" * 64, inputs={}, config={}) as writer:
        (writer.tmp / "train").mkdir()
        (writer.tmp / "train" / "rows.arrow").write_bytes(b"rows")
    return SimpleNamespace(cfg=cfg, packed=packed, out=tmp_path / "artifact" / "adapter", mount=mount)


def cluster_of(kube: FakeKube) -> trainjob.Cluster:
    from kubernetes import client

    api = client.ApiClient(client.Configuration(host=kube.url))
    return trainjob.Cluster.connect(api, namespace=kube.namespace, **FAST)


def go(kube, inputs, lines=None, **kw):
    from kubernetes import client

    return trainjob.train_on_nodes(
        inputs.cfg,
        inputs.packed,
        inputs.out,
        nodes=kw.pop("nodes", 2),
        pool=kw.pop("pool", "cpu"),
        image=IMAGE,
        checkpoint_pvc=CLAIM,
        checkpoint_gcsfuse=True,
        run_id=RUN_ID,
        api_client=client.ApiClient(client.Configuration(host=kube.url)),
        environ={**OWN_POD},
        mount=str(inputs.mount),
        poll_s=POLL,
        emit=(lines.append if lines is not None else lambda line: None),
        cluster_options=FAST,
        **kw,
    )


def arg(job: dict, flag: str) -> Path:
    command = job["spec"]["trainer"]["command"]
    return Path(command[command.index(flag) + 1])


def train_for_real_enough(job: dict) -> None:
    """What rank 0 leaves behind: a complete adapter folder at --out, from the staged config and packed data."""
    cfg = load(arg(job, "--config"))
    packed = artifacts.read_manifest(arg(job, "--packed"), "pack")
    with artifacts.stage_output(arg(job, "--out"), "train", "a" * 64, inputs={"packed": packed}, config={}) as w:
        (w.tmp / "adapter_config.json").write_text(json.dumps({"r": cfg.lora.r}))
        (w.tmp / "training_summary.json").write_text(json.dumps({"global_step": 3, "world_size": 2}))


def succeed(kube: FakeKube, job: dict) -> None:
    name = job["metadata"]["name"]
    time.sleep(0.1)
    pods = kube.add_nodes(name, job["spec"]["trainer"]["numNodes"])
    kube.condition(name, "Created", "JobsCreationSucceeded")
    for step in range(1, 4):
        kube.log(pods[0], f"step {step} loss {3.0 - step / 2}")
        kube.log(pods[1], f"rank 1 step {step}")
        time.sleep(0.05)
    train_for_real_enough(job)
    for pod in pods:
        kube.end_pod(pod, 0)
    kube.condition(name, "Complete", "JobSetCompleted", "jobset completed successfully")


def test_a_successful_trainjob_hands_the_adapter_on_and_is_deleted(kube, inputs):
    kube.controller = succeed
    lines: list[str] = []
    out = go(kube, inputs, lines)
    assert out == inputs.out
    assert json.loads((out / "adapter_config.json").read_text()) == {"r": Config().lora.r}
    assert artifacts.read_manifest(out, "train")["fingerprint"] == "a" * 64
    assert lines == ["[node-0] step 1 loss 2.5", "[node-0] step 2 loss 2.0", "[node-0] step 3 loss 1.5"]

    (post,) = kube.calls("POST")
    body = post.body
    name = f"kubetune-{RUN_ID}-3f5e2a10"
    assert body["metadata"]["name"] == name
    assert body["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": OWN_POD["KFP_POD_NAME"], "uid": OWN_POD["KFP_POD_UID"]}
    ]
    assert trainjob.validate(body) == body
    # the service account of the task's own pod, read from the API
    pod = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["template"]["spec"]["template"]["spec"]["serviceAccountName"] == "kubetune-pipeline"
    # the inputs were staged on the shared volume, the config with the run's checkpoint folder
    work = inputs.mount / RUN_ID / "trainjob"
    assert artifacts.read_manifest(work / "packed", "pack")["fingerprint"] == "f" * 64
    assert (work / "packed" / "train" / "rows.arrow").read_bytes() == b"rows"
    assert load(work / "config.yaml").train.checkpoint_dir == str(inputs.mount / RUN_ID)
    # cleaned up, and only the endpoints the module docstring lists were called
    assert name not in kube.trainjobs and kube.calls("DELETE", f"/trainjobs/{name}$")
    base = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs"
    assert kube.endpoints() == {
        "GET /api/v1/namespaces/{ns}/pods/{name}",
        f"GET {base}",
        f"POST {base}",
        f"GET {base}/{{name}}",
        f"DELETE {base}/{{name}}",
        "GET /api/v1/namespaces/{ns}/pods",
        "GET /api/v1/namespaces/{ns}/pods/{name}/log follow",
    }


def test_the_inputs_are_staged_once_per_run(kube, inputs):
    kube.controller = succeed
    go(kube, inputs)
    packed_copy = inputs.mount / RUN_ID / "trainjob" / "packed" / "manifest.json"
    before = packed_copy.stat().st_mtime_ns
    kube.trainjobs.clear()
    shutil_out = inputs.out
    import shutil

    shutil.rmtree(shutil_out)
    go(kube, inputs)  # a retry: the same packed data is not copied again; rank 0's adapter is up to date
    assert packed_copy.stat().st_mtime_ns == before


def fail_on_rank_1(kube: FakeKube, job: dict) -> None:
    name = job["metadata"]["name"]
    pods = kube.add_nodes(name, 2)
    kube.log(pods[0], "step 1 loss 2.5")
    kube.log(pods[1], *[f"noise {i}" for i in range(40)], "Traceback (most recent call last):", "RuntimeError: boom")
    time.sleep(0.1)
    kube.end_pod(pods[1], 1, finished_at="2026-01-01T01:00:00Z")
    kube.log(pods[0], "torch.distributed: connection reset by peer")
    kube.end_pod(pods[0], 1, finished_at="2026-01-01T01:00:07Z")
    kube.condition(name, "Failed", "FailedJobs", "jobset failed: node-0 failed")


def test_a_failed_trainjob_names_the_first_failing_pod_and_its_last_lines(kube, inputs):
    kube.controller = fail_on_rank_1
    with pytest.raises(trainjob.TrainJobFailed) as err:
        go(kube, inputs)
    message = str(err.value)
    name = f"kubetune-{RUN_ID}-3f5e2a10"
    assert message.startswith(f"TrainJob {name} failed (FailedJobs: jobset failed: node-0 failed): pod {name}-node-0-1")
    assert "(node 1) exited with code 1 (Error)" in message
    assert message.rstrip().endswith("RuntimeError: boom")
    assert "Traceback (most recent call last):" in message
    assert f"noise {40 - trainjob.LOG_TAIL_LINES + 2}" in message and "noise 0\n" not in message  # the tail only
    assert not isinstance(err.value, Preempted)
    assert name not in kube.trainjobs and not inputs.out.exists()


def preempt_with_marker(kube: FakeKube, job: dict, *, when: float | None = None) -> None:
    name = job["metadata"]["name"]
    pods = kube.add_nodes(name, 2)
    time.sleep(0.05)
    ckpt = arg(job, "--out").parents[1]  # the run's checkpoint folder
    marker = {"step": 7, "checkpoint": str(ckpt / "checkpoint-7"), "world_size": 2, "time": when or time.time() + 1}
    (ckpt / PREEMPTED_FILE).write_text(json.dumps(marker))
    for pod in pods:
        kube.end_pod(pod, 1)
    kube.condition(name, "Failed", "FailedJobs", "jobset failed")


def test_a_preempted_trainjob_raises_preempted_for_the_retry(kube, inputs):
    kube.controller = preempt_with_marker
    with pytest.raises(trainjob.TrainJobPreempted) as err:
        go(kube, inputs)
    assert isinstance(err.value, Preempted) and err.value.exit_code == EXIT_PREEMPTED == 3
    assert err.value.step == 7 and err.value.checkpoint.endswith("checkpoint-7")
    assert "preempted at step 7 (world size 2)" in str(err.value) and "the retry resumes from it" in str(err.value)
    assert not kube.trainjobs


def test_an_old_preemption_marker_is_not_taken_for_this_job(kube, inputs):
    kube.controller = lambda k, j: preempt_with_marker(k, j, when=time.time() - 3600)
    with pytest.raises(trainjob.TrainJobFailed):
        go(kube, inputs)


def drained(kube: FakeKube, job: dict) -> None:
    name = job["metadata"]["name"]
    pods = kube.add_nodes(name, 2)
    time.sleep(0.05)
    kube.disrupt(pods[1])
    kube.end_pod(pods[1], 143, reason="Error")
    kube.end_pod(pods[0], 1)
    kube.condition(name, "Failed", "FailedJobs", "jobset failed")


def test_pods_taken_by_a_node_drain_count_as_preemption(kube, inputs):
    kube.controller = drained
    with pytest.raises(trainjob.TrainJobPreempted, match=r"node-0-1-x1 was taken off its node \(EvictionByEvictionAPI"):
        go(kube, inputs)


def run_forever(kube: FakeKube, job: dict) -> None:
    pods = kube.add_nodes(job["metadata"]["name"], 2)
    kube.log(pods[0], "step 1 loss 2.5")


def test_sigterm_to_the_task_deletes_the_trainjob_and_means_preempted(kube, inputs):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    kube.controller = run_forever

    def terminate_once_submitted():
        deadline = time.monotonic() + 10
        while not kube.trainjobs and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_once_submitted, daemon=True).start()
    with pytest.raises(trainjob.TrainJobPreempted, match=r"stopped \(SIGTERM\) while TrainJob .* ran; deleted it"):
        go(kube, inputs)
    assert not kube.trainjobs and kube.calls("DELETE")
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_existing_trainjob_of_this_attempt_is_adopted_not_duplicated(kube, inputs):
    obj = built(2, "cpu", work_dir=str(inputs.mount / RUN_ID / "trainjob"), mount=str(inputs.mount))
    existing = kube.store(obj)  # a create whose answer was lost, or a restarted task
    threading.Thread(target=succeed, args=(kube, existing), daemon=True).start()
    out = go(kube, inputs)
    assert (out / "adapter_config.json").is_file()
    assert len(kube.calls("POST")) == 1  # answered 409
    assert len(kube.calls("GET", f"/trainjobs/{obj['metadata']['name']}$")) >= 2


def test_a_trainjob_of_the_same_name_owned_by_another_pod_is_not_adopted(kube, inputs):
    obj = built(2, "cpu", work_dir=str(inputs.mount / RUN_ID / "trainjob"), mount=str(inputs.mount))
    obj["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    kube.store(obj)
    with pytest.raises(trainjob.TrainJobFailed, match="exists and belongs to another pod"):
        go(kube, inputs)
    assert obj["metadata"]["name"] in kube.trainjobs and not kube.calls("DELETE")  # not ours to delete


def test_a_trainjob_left_by_an_earlier_attempt_is_deleted_first(kube, inputs):
    earlier = built(
        2,
        "cpu",
        name=trainjob.job_name(RUN_ID, "0badcafe"),
        work_dir=str(inputs.mount / RUN_ID / "x"),
        mount=str(inputs.mount),
    )
    kube.store(earlier)
    kube.add_nodes(earlier["metadata"]["name"], 2)
    kube.controller = succeed
    go(kube, inputs)
    first_delete = kube.calls("DELETE")[0]
    assert (
        first_delete.path.endswith(earlier["metadata"]["name"])
        and first_delete.query["propagationPolicy"] == "Foreground"
    )
    assert kube.requests.index(first_delete) < kube.requests.index(kube.calls("POST")[0])


def test_transient_api_errors_are_retried(kube, inputs):
    kube.controller = succeed
    kube.fail("POST", "/trainjobs$", 500)
    kube.fail("GET", "/trainjobs/[^/]+$", 503)
    kube.fail("GET", "/pods/[^/]+$", 429)
    out = go(kube, inputs)
    assert (out / "adapter_config.json").is_file()
    assert len(kube.calls("POST")) == 2  # the 500, then the create


def test_a_refused_request_is_one_clear_error(kube, inputs):
    for _ in range(FAST["attempts"]):
        kube.fail("POST", "/trainjobs$", 500)
    with pytest.raises(Exception, match="500"):
        go(kube, inputs)
    cluster = cluster_of(kube)
    kube.fail("GET", "/pods/missing$", 403)
    with pytest.raises(trainjob.KubernetesError, match=r"refused to get pod missing \(403: .*service account needs"):
        cluster.pod("missing")


def test_a_trainjob_that_never_ends_is_given_up_and_deleted(kube, inputs):
    kube.controller = run_forever
    cluster = cluster_of(kube)
    obj = built(2, "cpu", work_dir=str(inputs.mount / RUN_ID / "trainjob"), mount=str(inputs.mount))
    with pytest.raises(trainjob.TrainJobFailed, match="did not finish within 0 s"):
        trainjob.run(cluster, obj, checkpoint_dir=str(inputs.mount / RUN_ID), timeout_s=0.3, poll_s=POLL)
    assert not kube.trainjobs


def test_a_trainjob_deleted_under_the_task_fails_it(kube, inputs):
    def delete_it(k, job):
        time.sleep(0.1)
        k.trainjobs.pop(job["metadata"]["name"], None)

    kube.controller = delete_it
    with pytest.raises(trainjob.TrainJobFailed, match="was deleted while the train task waited"):
        go(kube, inputs)


def test_the_task_must_know_its_pod(kube, inputs):
    from kubernetes import client

    api = client.ApiClient(client.Configuration(host=kube.url))
    cluster = trainjob.Cluster.connect(api, namespace=kube.namespace, **FAST)
    with pytest.raises(trainjob.TrainJobFailed, match="neither KFP_POD_NAME nor HOSTNAME"):
        trainjob.own_pod(cluster, {})
    assert trainjob.own_pod(cluster, {"HOSTNAME": OWN_POD["KFP_POD_NAME"]}).uid == OWN_POD["KFP_POD_UID"]
    with pytest.raises(trainjob.TrainJobFailed, match="but KFP_POD_UID says"):
        trainjob.own_pod(cluster, {**OWN_POD, "KFP_POD_UID": "other"})


def test_bad_requests_fail_before_anything_is_written(kube, inputs):
    cfg = inputs.cfg.replace(**{"train.checkpoint_dir": "/elsewhere/run"})
    with pytest.raises(UserError, match="is not on the checkpoint volume"):
        go(kube, SimpleNamespace(**{**vars(inputs), "cfg": cfg}))
    assert not kube.requests and not (inputs.mount / RUN_ID).exists()


# --- the component body ----------------------------------------------------------------------------------------


def _artifact(path: Path) -> SimpleNamespace:
    return SimpleNamespace(path=str(path), metadata={}, metrics={}, log_metric=lambda k, v: None)


def call_train_component(inputs, tmp_path, train_nodes: int):
    import inspect

    from components import stages
    from components.params import CONFIG_KEYS, defaults

    form = defaults()
    config = {name: form[name] for name in CONFIG_KEYS if name in inspect.signature(stages.train).parameters}
    config["model"] = "org/model"
    return stages.train(
        packed_dataset=_artifact(inputs.packed),
        checkpoint_root=str(inputs.mount),
        run_id=RUN_ID,
        train_nodes=train_nodes,
        train_pool="cpu",
        train_image=IMAGE,
        checkpoint_pvc=CLAIM,
        checkpoint_gcsfuse=False,
        config_yaml="",
        overrides=[],
        adapter=_artifact(inputs.out),
        train_metrics=_artifact(tmp_path / "metrics"),
        **config,
    )


@pytest.fixture
def component_on_fake(kube, monkeypatch):
    """The train component's TrainJob path pointed at the fake API (and the stand-in mount)."""
    import functools

    from kubernetes import client

    def on_fake(inputs):
        real = trainjob.train_on_nodes
        patched = functools.partial(
            real,
            api_client=client.ApiClient(client.Configuration(host=kube.url)),
            environ={**OWN_POD},
            mount=str(inputs.mount),
            poll_s=POLL,
            emit=lambda line: None,
            cluster_options=FAST,
        )
        monkeypatch.setattr(trainjob, "train_on_nodes", patched)

    return on_fake


def test_the_train_component_with_two_nodes_runs_the_trainjob(kube, inputs, tmp_path, component_on_fake):
    component_on_fake(inputs)
    kube.controller = succeed
    call_train_component(inputs, tmp_path, train_nodes=2)
    assert (inputs.out / "adapter_config.json").is_file()
    assert kube.calls("POST", "/trainjobs$")[0].body["spec"]["trainer"]["numNodes"] == 2


def test_the_train_component_exits_3_when_the_trainjob_is_preempted(kube, inputs, tmp_path, component_on_fake, capsys):
    component_on_fake(inputs)
    kube.controller = preempt_with_marker
    with pytest.raises(SystemExit) as exit_:
        call_train_component(inputs, tmp_path, train_nodes=2)
    assert exit_.value.code == 3
    assert "preempted at step 7" in capsys.readouterr().err


def test_the_train_component_refuses_zero_nodes(kube, inputs, tmp_path):
    with pytest.raises(UserError, match="pipeline parameter `train_nodes`: 0"):
        call_train_component(inputs, tmp_path, train_nodes=0)
    assert not kube.requests


def restart_once(kube: FakeKube, job: dict) -> None:
    """The JobSet restarts (a node failed; the runtime allows a restart): rank 0 is a new pod, then it succeeds."""
    name = job["metadata"]["name"]
    first = kube.add_nodes(name, 2)
    kube.log(first[0], "attempt 0 step 1")
    _until_shown(kube, 1)
    kube.log(first[0], "attempt 0 step 2")
    for pod in first:
        kube.end_pod(pod, 1)
    _until_shown(kube, 2)  # the follower has read the ended pod to its end before the new rank 0 appears
    second = kube.add_nodes(name, 2, restart=1)
    kube.log(second[0], "attempt 1 resumed at step 2")
    _until_shown(kube, 3)
    train_for_real_enough(job)
    for pod in second:
        kube.end_pod(pod, 0)
    kube.condition(name, "Complete", "JobSetCompleted")


def _until_shown(kube: FakeKube, n: int, timeout_s: float = 30.0) -> None:
    """Wait until the task has shown ``n`` log lines (``kube.shown``, the test's list), instead of guessing a delay."""
    deadline = time.monotonic() + timeout_s
    while len(kube.shown) < n:
        assert time.monotonic() < deadline, f"the task showed {kube.shown} of {n} log lines within {timeout_s} s"
        time.sleep(0.02)


def test_the_log_follows_rank_0_across_a_restart_without_repeating_lines(kube, inputs):
    kube.controller = restart_once
    lines: list[str] = []
    kube.shown = lines
    go(kube, inputs, lines)
    assert lines == ["[node-0] attempt 0 step 1", "[node-0] attempt 0 step 2", "[node-0] attempt 1 resumed at step 2"]
