"""The CPU image, built from images/Dockerfile and run: every KFP component's real command line inside it.

The image is built by ``images/local-build.sh cpu`` (buildah, on the stand-in base of images/local-base.sh; the
Dockerfile after its FROM lines is the cloud build's). It is reused while its inputs are unchanged: its tag is a
hash of them, so a second ``make test`` builds nothing. Then, as the image's non-root user, each task of the
compiled pipeline runs with the container command and arguments the compiled spec gives it, and the executor input
the KFP launcher would write: artifact URIs ``gs://BUCKET/...``, which kfp's executor reads as ``/gcs/BUCKET/...``
(the GCS FUSE mount), served here by a host folder mounted at ``/gcs``. The chain is prepare -> pack -> train-cpu
-> evaluate -> register on the tiny real model, against an MLflow server on loopback.

Needs root and buildah (``apt-get install -y buildah debootstrap``); without them the tier skips, and under CI
(``CI`` set, where .ci/run installs buildah) it fails instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from integration.mlflow_server import MlflowServer  # tests/integration (tests/ is on sys.path)

# slow too: a cold build takes minutes, so `make test-unit` (not slow) leaves the tier out; `make test` runs it.
pytestmark = [pytest.mark.images, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
UID = 10001  # the image's user (images/Dockerfile: useradd --uid 10001, USER 10001:10001)
BUCKET = "kubetune-images-test"
# Mount points inside the container: the bucket's FUSE mount, the launcher's output folder, the model.
GCS, KFP_OUTPUTS, MODEL = "/gcs", "/tmp/kfp_outputs", "/models/stories260K"
# A budget for the image, compressed layers excluded: base ~200 MB, compiler ~190 MB, venv ~2.2 GB.
SIZE_BUDGET = 2.8e9
CHAIN = ("prepare", "pack", "train-cpu", "evaluate", "register")
# Which upstream output each input artifact is (the DAG's wiring, checked against the compiled spec below).
WIRING = {
    "pack": {"prepared_dataset": ("prepare", "prepared_dataset")},
    "train-cpu": {"packed_dataset": ("pack", "packed_dataset")},
    "evaluate": {
        "adapter": ("train-cpu", "adapter"),
        "packed_dataset": ("pack", "packed_dataset"),
        "prepared_dataset": ("prepare", "prepared_dataset"),
    },
    "register": {
        "adapter": ("train-cpu", "adapter"),
        "eval_report": ("evaluate", "eval_report"),
        "packed_dataset": ("pack", "packed_dataset"),
        "prepared_dataset": ("prepare", "prepared_dataset"),
    },
}


def _require_buildah() -> str:
    why = None
    if os.geteuid() != 0:
        why = "the images tier needs root (buildah --isolation chroot)"
    elif shutil.which("buildah") is None or shutil.which("debootstrap") is None:
        why = "the images tier needs buildah and debootstrap: apt-get install -y buildah debootstrap"
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return shutil.which("buildah")


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


@pytest.fixture(scope="module")
def cpu_image() -> str:
    _require_buildah()
    # A cold build takes about 10 minutes on 2 cores; a cached one seconds.
    result = _run([str(ROOT / "images" / "local-build.sh"), "cpu"], timeout=2400, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()[-1]


class Container:
    """A buildah working container of ``image``, run as the image's user with host folders mounted."""

    def __init__(self, image: str, mounts: dict[str, str]):
        self.mounts = mounts  # container path -> host path (":ro" suffix on the host path for read-only)
        result = _run(["buildah", "from", "--pull-never", image], timeout=300)
        assert result.returncode == 0, result.stderr
        self.name = result.stdout.strip()

    def run(self, argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
        volumes = []
        for ctr, host in self.mounts.items():
            source, ro = host.removesuffix(":ro"), host.endswith(":ro")
            volumes += ["-v", f"{source}:{ctr}" + (":ro" if ro else "")]
        return _run(
            ["buildah", "run", "--isolation", "chroot", "--user", f"{UID}:{UID}", *volumes, self.name, "--", *argv],
            timeout=timeout,
        )

    def changes(self) -> list[str]:
        """Every path the container's writable layer holds (overlay's upper folder): what the runs wrote."""
        result = _run(["buildah", "mount", self.name], timeout=60)
        assert result.returncode == 0, result.stderr
        upper = Path(result.stdout.strip()).parent / "diff"
        assert upper.is_dir(), f"{upper}: buildah's storage is not overlay; the write check reads its upper folder"
        return sorted("/" + str(p.relative_to(upper)) for p in upper.rglob("*"))

    def remove(self) -> None:
        _run(["buildah", "rm", self.name], timeout=120)


def _component_specs() -> tuple[dict, dict, dict]:
    """(components, executors, constants) of the compiled pipeline, compiled here with the image references of the
    cloud. ``constants``: per task, the parameters the DAG binds to compile-time constants (the train tasks' pool,
    image, checkpoint claim), which the KFP launcher passes the way it passes the run's arguments."""
    from pipelines.sft_pipeline import compile_pipeline

    out = ROOT / "build" / "images-local" / "sft_pipeline.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = next(yaml.safe_load_all(compile_pipeline(out).read_text()))
    constants: dict[str, dict] = {}
    for dag in [spec["root"], *spec["components"].values()]:
        for name, task in dag.get("dag", {}).get("tasks", {}).items():
            for parameter, value in task.get("inputs", {}).get("parameters", {}).items():
                if "constant" in value.get("runtimeValue", {}):
                    constants.setdefault(name, {})[parameter] = value["runtimeValue"]["constant"]
    return spec["components"], spec["deploymentSpec"]["executors"], constants


def _executor_input(component: dict, arguments: dict, inputs: dict, task: str) -> dict:
    """The executor input the KFP launcher writes for ``task``: parameters, input artifacts (upstream outputs with
    their metadata) and output artifacts under gs://BUCKET/root/TASK/NAME, output files in the launcher's folder."""
    from google.protobuf import json_format
    from kfp import dsl
    from kfp.local import executor_input_utils
    from kfp.pipeline_spec import pipeline_spec_pb2

    spec = json_format.ParseDict(component, pipeline_spec_pb2.ComponentSpec())
    args = {name: arguments[name] for name in component["inputDefinitions"].get("parameters", {})}
    for name, artifact in inputs.items():
        a = dsl.Artifact(name=artifact["name"], uri=artifact["uri"], metadata=artifact.get("metadata", {}))
        a.schema_title = component["inputDefinitions"]["artifacts"][name]["artifactType"]["schemaTitle"]
        args[name] = a
    message = executor_input_utils.construct_executor_input(spec, args, f"gs://{BUCKET}/root/{task}", False)
    executor_input = executor_input_utils.executor_input_to_dict(message, spec)
    outputs = executor_input["outputs"]
    for name, parameter in outputs.get("parameters", {}).items():
        parameter["outputFile"] = f"{KFP_OUTPUTS}/{task}/{name}"
    outputs["outputFile"] = f"{KFP_OUTPUTS}/{task}/output_metadata.json"
    return executor_input


def _command(executor: dict, executor_input: dict) -> list[str]:
    container = executor["container"]
    argv = [*container["command"], *container["args"]]
    return [json.dumps(executor_input) if a == "{{$}}" else a for a in argv]


@pytest.fixture(scope="module")
def pipeline_run(cpu_image, tmp_path_factory, stories_dir):
    from pipelines.arguments import load_config, pipeline_arguments

    tmp = tmp_path_factory.mktemp("cpu-image")
    gcs, kfp_outputs = tmp / "gcs", tmp / "kfp_outputs"
    bucket = gcs / BUCKET
    (bucket / "data").mkdir(parents=True)
    kfp_outputs.mkdir()
    rows = [{"instruction": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(40)]
    (bucket / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in (gcs, bucket, bucket / "data", bucket / "data" / "rows.jsonl", kfp_outputs):
        os.chown(path, UID, UID)

    server = MlflowServer(tmp / "mlflow").start()
    try:
        config = tmp / "config.yaml"
        config.write_text(
            f"model: {{name_or_path: {MODEL}}}\n"
            f"data: {{path: {GCS}/{BUCKET}/data/rows.jsonl, eval_size: 8}}\n"
            "pack: {max_length: 128}\n"
            "lora: {r: 4, alpha: 8}\n"
            "train: {max_steps: 2, batch_size: 2, save_steps: 1}\n"
            "eval: {max_rows: 4, num_samples: 1, max_new_tokens: 8}\n"
            f"tracking: {{uri: '{server.uri}', experiment: images-test, registered_model: kt-images}}\n"
            f"output_dir: {GCS}/{BUCKET}/runs\n"
        )
        raw, cfg = load_config(config)
        arguments = pipeline_arguments(raw, cfg, checkpoint_root=f"{GCS}/{BUCKET}/checkpoints")
        arguments["run_id"] = "images-test-run"
        components, executors, constants = _component_specs()
        container = Container(cpu_image, {GCS: str(gcs), KFP_OUTPUTS: str(kfp_outputs), MODEL: f"{stories_dir}:ro"})
        results, outputs = {}, {}
        try:
            for task in CHAIN:
                component = components[f"comp-{task}"]
                assert set(WIRING.get(task, {})) == set(component["inputDefinitions"].get("artifacts", {})), task
                inputs = {name: outputs[src][key] for name, (src, key) in WIRING.get(task, {}).items()}
                bound = {**arguments, **constants.get(task, {}), "run_id": arguments["run_id"]}
                executor_input = _executor_input(component, bound, inputs, task)
                result = container.run(_command(executors[component["executorLabel"]], executor_input))
                results[task] = result
                if result.returncode != 0:
                    break
                written = json.loads((kfp_outputs / task / "output_metadata.json").read_text())
                outputs[task] = {}
                for name, entry in executor_input["outputs"]["artifacts"].items():
                    artifact = dict(entry["artifacts"][0])
                    produced = written.get("artifacts", {}).get(name, {}).get("artifacts", [{}])[0]
                    artifact["metadata"] = produced.get("metadata", {})
                    outputs[task][name] = artifact
            pip_check = container.run(["pip", "check"], timeout=300)
            changes = container.changes()
        finally:
            container.remove()
        yield {
            "results": results,
            "outputs": outputs,
            "gcs": gcs,
            "kfp_outputs": kfp_outputs,
            "server": server,
            "pip_check": pip_check,
            "changes": changes,
        }
    finally:
        server.stop()


def _host_path(gcs: Path, uri: str) -> Path:
    assert uri.startswith("gs://"), uri
    return gcs / uri.removeprefix("gs://")


def test_every_component_runs_in_the_image_as_its_user(pipeline_run):
    for task in CHAIN:
        result = pipeline_run["results"].get(task)
        assert result is not None, f"{task} did not run: an earlier task failed"
        assert result.returncode == 0, f"{task} failed in the image:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    outputs, gcs = pipeline_run["outputs"], pipeline_run["gcs"]
    prepared = _host_path(gcs, outputs["prepare"]["prepared_dataset"]["uri"])
    assert (prepared / "train.jsonl").is_file() and (prepared / "manifest.json").is_file()
    assert (_host_path(gcs, outputs["pack"]["packed_dataset"]["uri"]) / "manifest.json").is_file()
    adapter = _host_path(gcs, outputs["train-cpu"]["adapter"]["uri"])
    assert (adapter / "adapter_model.safetensors").is_file()
    # files the image's user wrote belong to it (a pod's runAsUser on the bucket's mount)
    assert adapter.stat().st_uid == UID
    # the register task's return value, in the executor output the launcher reads: a first version is promoted
    written = json.loads((pipeline_run["kfp_outputs"] / "register" / "output_metadata.json").read_text())
    assert written["parameterValues"]["Output"] == "promoted"
    assert pipeline_run["outputs"]["register"]["registration"]["metadata"]["version"] == "1"


def test_the_run_is_registered_in_mlflow(pipeline_run):
    from mlflow import MlflowClient

    client = MlflowClient(pipeline_run["server"].uri)
    versions = client.search_model_versions("name='kt-images'")
    assert len(versions) == 1
    assert client.get_run(versions[0].run_id).data.params


def test_tcmalloc_is_the_allocator_the_train_stage_recorded(pipeline_run):
    adapter = _host_path(pipeline_run["gcs"], pipeline_run["outputs"]["train-cpu"]["adapter"]["uri"])
    summary = json.loads((adapter / "training_summary.json").read_text())
    allocator = summary["settings"]["allocator"]
    assert allocator["value"] == "tcmalloc", allocator


def test_pip_check_is_clean_inside(pipeline_run):
    result = pipeline_run["pip_check"]
    assert result.returncode == 0 and "No broken requirements" in result.stdout, result.stdout + result.stderr


def test_nothing_is_written_outside_the_mounts_and_tmp(pipeline_run):
    mounts = (GCS, KFP_OUTPUTS, MODEL)
    # the mount points themselves (and the folders buildah creates to hold them) are empty folders in the layer
    holders = {p for m in mounts for p in [m, *map(str, Path(m).parents)]} | {"/tmp"}
    # /run itself: buildah run mounts its own files there (/run/.containerenv); nothing below it may be new
    holders.add("/run")
    stray = [p for p in pipeline_run["changes"] if p not in holders and not p.startswith("/tmp/")]
    stray = [p for p in stray if not any(p == m or p.startswith(m + "/") for m in mounts)]
    assert not stray, "the image wrote outside its mounts and /tmp:\n" + "\n".join(stray[:60])


def test_image_size_within_budget(cpu_image):
    result = _run(["buildah", "images", "--json", cpu_image], timeout=60)
    assert result.returncode == 0, result.stderr
    text = json.loads(result.stdout)[0]["size"]  # buildah prints decimal units, e.g. "2.51 GB"
    number, unit = re.fullmatch(r"([\d.]+)\s*([kMG]?B)", text).groups()
    size = float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    print(f"{cpu_image}: {text}", file=sys.stderr)
    assert size < SIZE_BUDGET, f"{cpu_image} is {text}, over the {SIZE_BUDGET / 1e9:.1f} GB budget"
