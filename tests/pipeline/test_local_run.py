"""The whole pipeline through kfp.local on the tiny real model (../shared/data/stories260K/hf), and the local
runner's dsl.OneOf patch."""

# No `from __future__ import annotations`: KFP reads the toy components' annotations as types.
import json
from pathlib import Path

import pytest
from kfp import dsl, local
from kfp.dsl import Input, Model, Output

from pipelines.local import _oneof_artifacts, run_local

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------------------
# kfp 2.17.3's local runner and artifact dsl.OneOf


def _make(n: int, model: Output[Model]):
    import os

    os.makedirs(model.path)
    with open(os.path.join(model.path, "n.txt"), "w") as f:
        f.write(str(n))


def _read(model: Input[Model]) -> str:
    with open(model.path + "/n.txt") as f:
        return f.read()


def _oneof_pipeline():
    make = dsl.component(_make, base_image="python:3.11", install_kfp_package=False)
    read = dsl.component(_read, base_image="python:3.11", install_kfp_package=False)

    @dsl.pipeline(name="oneof-probe")
    def probe(flag: bool = True) -> str:
        with dsl.If(flag == True):  # noqa: E712 - a KFP condition
            a = make(n=1)
        with dsl.Else():
            b = make(n=2)
        return read(model=dsl.OneOf(a.outputs["model"], b.outputs["model"])).output

    return probe


def test_local_runner_needs_the_oneof_patch_and_the_patch_picks_the_branch_that_ran(tmp_path):
    """If this fails because the unpatched run works, kfp fixed its local runner: drop the patch."""
    probe = _oneof_pipeline()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="Expected 1 artifact in ArtifactSelectorSpec"):
        probe(flag=True)
    with _oneof_artifacts():
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "b"))
        assert probe(flag=True).output == "1"
        assert probe(flag=False).output == "2"
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    assert OrchestratorUtils.get_dag_output_artifacts.__func__.__name__ == "get_dag_output_artifacts"
    assert OrchestratorUtils.get_dag_output_artifacts.__func__.__module__.startswith("kfp.")  # restored


# ------------------------------------------------------------------------------------------------
# the pipeline, end to end


def write_config(tmp_path: Path, model: Path) -> Path:
    rows = [{"instruction": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(40)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"model: {{name_or_path: {model}}}\n"
        f"data: {{path: {data}, eval_size: 8}}\n"
        "pack: {max_length: 128}\n"
        "lora: {r: 4, alpha: 8}\n"
        "train: {max_steps: 2, batch_size: 2, save_steps: 1}\n"
        "eval: {max_rows: 4, num_samples: 1, max_new_tokens: 8}\n"
        f"tracking: {{uri: 'sqlite:///{tmp_path}/mlflow.db', experiment: pipeline-e2e, "
        "registered_model: kt-e2e}\n"
    )
    return config


def task_outputs(run_dir: Path, task: str) -> dict:
    return json.loads((run_dir / task / "executor_output.json").read_text())


@pytest.mark.slow
def test_the_pipeline_runs_locally_end_to_end(tmp_path, stories_dir):
    from mlflow import MlflowClient

    config = write_config(tmp_path, stories_dir)
    root = tmp_path / "root"

    # 1. a first run trains (no champion yet) on the CPU branch and registers the champion
    first = run_local(config, root=root)
    run_dir = first.run_dir
    assert first.verdict == "no-champion"
    assert {
        "prepare/prepared_dataset",
        "prepare/data_report",
        "check-unchanged/decision",
        "pack/packed_dataset",
        "pack/pack_report",
        "train-cpu/adapter",
        "evaluate/eval_report",
        "evaluate/eval_summary",
        "register/registration",
        "register/registration_summary",
    } <= set(first.outputs)
    assert not (run_dir / "train-gpu").exists() and not (run_dir / "prepare-fresh").exists()

    prepared = first.outputs["prepare/prepared_dataset"]
    fingerprint = json.loads((prepared / "manifest.json").read_text())["fingerprint"]
    assert (prepared / "train.jsonl").is_file() and (prepared / "eval.jsonl").is_file()
    assert first.outputs["prepare/data_report"].read_text() == (prepared / "data_report.md").read_text()
    packed = first.outputs["pack/packed_dataset"]
    assert first.outputs["pack/pack_report"].read_text() == (packed / "pack_report.md").read_text()
    report = first.outputs["evaluate/eval_report"]
    assert first.outputs["evaluate/eval_summary"].read_text() == (report / "eval_report.md").read_text()
    assert "no-champion" in first.outputs["check-unchanged/decision"].read_text()

    adapter = first.outputs["train-cpu/adapter"]
    assert (adapter / "adapter_model.safetensors").is_file()
    summary = json.loads((adapter / "training_summary.json").read_text())
    assert summary["global_step"] == 2
    # checkpoints went to <checkpoint_root>/<run id>, outside the task's folder
    (ckpt_run,) = [p for p in (root / "checkpoints").iterdir() if p.is_dir()]  # beside it: the run's lock file
    assert (ckpt_run / "checkpoint-2").is_dir()

    # artifact metadata and metrics, as the KFP UI shows them
    prepare_out = task_outputs(run_dir, "prepare")["artifacts"]["prepared_dataset"]["artifacts"][0]["metadata"]
    assert prepare_out["fingerprint"] == fingerprint
    train_metrics = task_outputs(run_dir, "train-cpu")["artifacts"]["train_metrics"]["artifacts"][0]["metadata"]
    assert train_metrics["global_step"] == 2 and train_metrics["final_loss"] == pytest.approx(summary["final_loss"])
    eval_metrics = task_outputs(run_dir, "evaluate")["artifacts"]["eval_metrics"]["artifacts"][0]["metadata"]
    metrics = json.loads((report / "metrics.json").read_text())
    assert eval_metrics["eval_loss"] == pytest.approx(metrics["eval_loss"])

    # the MLflow run, the model version and the champion alias
    registration = first.registration
    assert registration["status"] == "registered" and registration["model_name"] == "kt-e2e"
    assert first.promotion == registration["promotion"] == "promoted"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(registration["run_id"])
    assert run.data.params["lora.r"] == "4" and run.data.params["train.max_steps"] == "2"
    assert run.data.metrics["eval_loss"] == pytest.approx(metrics["eval_loss"])
    champion = client.get_model_version_by_alias("kt-e2e", "champion")
    assert str(champion.version) == str(registration["version"])
    assert champion.tags["kubetune.data_fingerprint"] == fingerprint

    # 2. the same data again: the run records "unchanged" and stops before packing
    second = run_local(config, root=root)
    assert second.verdict == "unchanged"
    assert set(second.outputs) == {
        "prepare/prepared_dataset",
        "prepare/data_report",
        "check-unchanged/decision",
    }
    assert "training skipped" in second.outputs["check-unchanged/decision"].read_text()
    assert [str(m.version) for m in client.search_model_versions("name='kt-e2e'")] == [str(champion.version)]

    # 3. force, with another rank, on the GPU branch (placement is ignored locally; the branch and its
    # dsl.OneOf are not): a new adapter, so a new model version
    third = run_local(config, ["lora.r=8"], root=root, force=True, accelerator="gpu")
    assert third.verdict == "forced"
    assert "train-gpu/adapter" in third.outputs and not (third.run_dir / "train-cpu").exists()
    assert third.registration["status"] == "registered"
    assert int(third.registration["version"]) == int(champion.version) + 1
    assert third.promotion in ("promoted", "rejected")
