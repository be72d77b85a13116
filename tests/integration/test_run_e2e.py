"""`kubetune run` end to end on a real pretrained tiny model, tracking to a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, write_jsonl
from mlflow_server import MlflowServer

pytestmark = [pytest.mark.integration]

KUBETUNE = [sys.executable, "-m", "kubetune.cli"]


def _rows(n: int) -> list[dict]:
    names = ["Lily", "Tom", "Sue", "Ben", "Max", "Amy", "Tim", "Zoe"]
    things = ["ball", "cat", "tree", "car", "dog", "cake", "boat", "hat"]
    return [
        {
            "instruction": f"Tell a short story about {names[i % 8]} and a {things[(i // 8) % 8]}.",
            "response": f"Once upon a time, {names[i % 8]} found a {things[(i // 8) % 8]}. "
            f"{names[i % 8]} was very happy and played all day.",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*KUBETUNE, *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def test_run_tracks_to_a_real_server(stories_dir, mlflow_server, tmp_path):
    data = write_jsonl(tmp_path / "stories.jsonl", _rows(48))
    out = tmp_path / "run"
    sets = [
        f"model.name_or_path={stories_dir}",
        f"data.path={data}",
        f"output_dir={out}",
        "data.eval_size=8",
        "pack.max_length=128",
        "train.max_steps=12",
        "train.batch_size=4",
        "train.learning_rate=0.005",
        "train.save_steps=6",
        "lora.r=4",
        "lora.alpha=8",
        "lora.target_modules=[q_proj,v_proj]",
        "method=lora",
        f"tracking.uri={mlflow_server.uri}",
        "tracking.experiment=e2e",
        "tracking.registered_model=stories-e2e",
        "eval.num_samples=2",
        "eval.max_new_tokens=8",
    ]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("eval:\n  max_rows: 8\n")
    proc = _run(["run", "--config", str(cfg), *[a for s in sets for a in ("--set", s)]], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval loss" in proc.stdout and "MLflow:" in proc.stdout

    for stage in ("prepared", "packed", "adapter", "eval", "registered"):
        assert json.loads((out / stage / "manifest.json").read_text())["complete"] is True
    summary = json.loads((out / "adapter" / "training_summary.json").read_text())
    assert summary["global_step"] == 12 and summary["max_steps"] == 12 and summary["resumed_from_step"] is None
    assert summary["train_tokens_per_second"] > 0
    assert summary["loss_curve"][-1][1] < summary["loss_curve"][0][1]  # it learned the repeated story shape
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    reg = json.loads((out / "registered" / "registration.json").read_text())
    assert reg["status"] == "registered" and reg["promotion"] == "promoted" and reg["version"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(reg["run_id"])
    for key in ("eval_loss", "base_eval_loss", "train_tokens_per_second"):
        assert key in run.data.metrics, key
    assert run.data.metrics["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)
    assert run.data.params["lora.r"] == "4" and run.data.params["method"] == "lora"
    history = client.get_metric_history(reg["run_id"], "train_loss")
    assert len(history) == len(summary["loss_curve"])
    artifacts = {a.path for a in client.list_artifacts(reg["run_id"])}
    assert "adapter" in artifacts
    adapter_files = {Path(a.path).name for a in client.list_artifacts(reg["run_id"], "adapter")}
    assert {"adapter_model.safetensors", "adapter_config.json", "base_model.json"} <= adapter_files
    version = client.get_model_version("stories-e2e", reg["version"])
    assert version.tags["kubetune.promotion"] == "promoted" and version.tags["kubetune.promotion_reason"]
    assert client.get_model_version_by_alias("stories-e2e", "champion").version == reg["version"]

    # A second run that cannot beat the champion by the required margin is rejected and the alias stays.
    out2 = tmp_path / "run2"
    sets2 = [s.replace(str(out), str(out2)) for s in sets] + ["tracking.min_improvement=100", "train.max_steps=2"]
    proc = _run(["run", "--config", str(cfg), *[a for s in sets2 for a in ("--set", s)]], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reg2 = json.loads((out2 / "registered" / "registration.json").read_text())
    assert reg2["promotion"] == "rejected" and reg2["version"] != reg["version"]
    v2 = client.get_model_version("stories-e2e", reg2["version"])
    assert v2.tags["kubetune.promotion"] == "rejected"
    assert client.get_model_version_by_alias("stories-e2e", "champion").version == reg["version"]
