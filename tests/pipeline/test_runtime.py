"""components.runtime, in-process: the Config built from pipeline parameters, checkpoints per run, reports and
metrics into artifacts, and the "has the data changed since the champion?" decision."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from components import runtime
from kubetune.artifacts import stage_output
from kubetune.config import from_dict
from kubetune.errors import UserError


class FakeArtifact:
    """What a component body sees of a KFP artifact: a path, metadata, log_metric."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.metadata: dict = {}
        self.metrics: dict = {}

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name] = value


YAML = """
model: {name_or_path: base/model}
data: {path: data.jsonl, eval_size: 10}
lora: {r: 4, target_modules: [q_proj, v_proj]}
train: {batch_size: 2, learning_rate: 0.001}
"""


def test_named_parameters_override_config_yaml_and_overrides_win():
    cfg = runtime.build_config(
        YAML, ["train.batch_size=16", "lora.alpha=8"], lora_r=32, learning_rate=5e-4, model="other/model"
    )
    assert cfg.lora.r == 32  # named parameter over config_yaml
    assert cfg.train.learning_rate == 5e-4
    assert cfg.model.name_or_path == "other/model"
    assert cfg.train.batch_size == 16  # overrides applied last
    assert cfg.lora.alpha == 8.0
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]  # untouched config_yaml keys stay
    assert cfg.data.eval_size == 10.0


def test_empty_string_parameters_keep_the_config_yaml_value():
    cfg = runtime.build_config(YAML, [], model="", dataset="", registered_model="", mlflow_tracking_uri="")
    assert cfg.model.name_or_path == "base/model"
    assert cfg.data.path == "data.jsonl"
    assert cfg.tracking.registered_model is None and cfg.tracking.uri is None
    cfg = runtime.build_config("", None, mlflow_tracking_uri="http://mlflow:5000", registered_model="m")
    assert cfg.tracking.uri == "http://mlflow:5000" and cfg.tracking.registered_model == "m"


def test_overrides_beat_named_parameters():
    cfg = runtime.build_config("", ["lora.r=2"], lora_r=64)
    assert cfg.lora.r == 2


@pytest.mark.parametrize(
    ("config_yaml", "overrides", "params", "message"),
    [
        ("lora: {r: 4\n", [], {}, "pipeline parameter `config_yaml` line"),
        ("- a list\n", [], {}, "expected a mapping of config sections, got list"),
        ("", [], {"lora_r": 0}, "pipeline parameter `lora_r`: config key `lora.r`: 0 must be >= 1"),
        (
            "",
            [],
            {"method": "qlora4"},
            "pipeline parameter `method`: config key `method`: 'qlora4' is not one of",
        ),
        (
            "",
            ["lora.rank=8"],
            {},
            "pipeline parameters: unknown config key `lora.rank`; valid keys: r, alpha",
        ),
        (
            "",
            ["no-equals-sign"],
            {},
            "pipeline parameter `overrides`: --set `no-equals-sign`: expected KEY=VALUE",
        ),
        ("", "lora.r=8", {}, "pipeline parameter `overrides`: expected a list of KEY=VALUE strings"),
        ("train: {epochs: 0}\n", [], {}, "pipeline parameters: config key `train.epochs`: 0"),
    ],
)
def test_bad_parameters_name_the_parameter(config_yaml, overrides, params, message):
    with pytest.raises(UserError) as err:
        runtime.build_config(config_yaml, overrides, **params)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_config_from_layers_the_parameters_and_applies_extra_keys():
    cfg = runtime.config_from(YAML, [], extra={"train.checkpoint_dir": "/mnt/ckpt/abc", "train.seed": None}, lora_r=12)
    assert cfg.lora.r == 12
    assert cfg.train.checkpoint_dir == "/mnt/ckpt/abc"
    assert cfg.train.seed == 42  # None leaves the key alone
    with pytest.raises(TypeError):
        runtime.build_config("", [], accelerator="gpu")  # pipeline-only parameters never reach the config


def test_checkpoint_dir_is_per_run():
    assert runtime.checkpoint_dir("", "run-1") is None
    assert runtime.checkpoint_dir("/mnt/kubetune-checkpoints/", "run-1") == "/mnt/kubetune-checkpoints/run-1"
    with pytest.raises(UserError, match="is a URL, but checkpoints are written through the file system"):
        runtime.checkpoint_dir("gs://bucket/ckpt", "run-1")
    with pytest.raises(UserError, match="run id is missing"):
        runtime.checkpoint_dir("/mnt/c", "{{$.pipeline_job_uuid}}")


def test_publish_markdown_copies_the_report(tmp_path):
    stage = tmp_path / "prepared"
    stage.mkdir()
    (stage / "data_report.md").write_text("# Data report\n\n| rows | 10 |\n")
    artifact = FakeArtifact(tmp_path / "task" / "data_report")
    runtime.publish_markdown(stage, "data_report.md", artifact)
    assert Path(artifact.path).read_text() == "# Data report\n\n| rows | 10 |\n"
    with pytest.raises(FileNotFoundError, match=r"wrote no pack_report\.md"):
        runtime.publish_markdown(stage, "pack_report.md", artifact)


def test_log_metrics_keeps_finite_numbers_only(tmp_path):
    artifact = FakeArtifact(tmp_path / "m")
    logged = runtime.log_metrics(
        artifact,
        {
            "eval_loss": 1.25,
            "global_step": 2,
            "resumed_from_step": None,
            "loss_curve": [[1, 2.0]],
            "perplexity": math.inf,
            "merged": True,
            "settings": {"precision": "fp32"},
        },
    )
    assert logged == artifact.metrics == {"eval_loss": 1.25, "global_step": 2}


def write_stage(out: Path, stage: str, fp: str, counts: dict | None = None) -> Path:
    with stage_output(out, stage, fp, inputs={}, config={}) as w:
        (w.tmp / "train.jsonl").write_text("")
        w.counts.update(counts or {})
    return out


def test_annotate_copies_fingerprint_and_counts(tmp_path):
    out = write_stage(
        tmp_path / "prepared", "prepare", "f" * 64, {"train_rows": 90, "eval_rows": 10, "format": "alpaca"}
    )
    artifact = FakeArtifact(out)
    meta = runtime.annotate(artifact, out, base_model="m")
    assert (
        meta
        == artifact.metadata
        == {"fingerprint": "f" * 64, "stage": "prepare", "train_rows": 90, "eval_rows": 10, "base_model": "m"}
    )


@pytest.mark.parametrize(
    ("champion", "force", "verdict"),
    [
        (None, False, "no-champion"),
        ("a" * 64, False, "unchanged"),
        ("b" * 64, False, "new-data"),
        ("a" * 64, True, "forced"),
    ],
)
def test_decide_compares_the_data_with_the_champion(tmp_path, monkeypatch, champion, force, verdict):
    import kubetune.register

    prepared = write_stage(tmp_path / "prepared", "prepare", "a" * 64)
    seen = []

    def fake_champion(cfg):
        seen.append(cfg.tracking.registered_model)
        return champion

    monkeypatch.setattr(kubetune.register, "champion_data_fingerprint", fake_champion)
    cfg = from_dict(
        {
            "model": {"name_or_path": "org/base"},
            "tracking": {"registered_model": "kt-base", "uri": "http://mlflow:5000"},
        }
    )
    got, markdown = runtime.decide(cfg, prepared, force=force, accelerator="cpu")
    assert got == verdict
    assert seen == ["kt-base"]
    assert f"**{verdict}**" in markdown
    assert f"| this run | `{'a' * 64}` |" in markdown
    assert f"| champion | `{champion or '-'}` |" in markdown
    assert "`kt-base` at `http://mlflow:5000`" in markdown
    assert (got == runtime.UNCHANGED) == (verdict == "unchanged")


def test_decide_refuses_a_bad_accelerator_and_a_non_prepare_input(tmp_path, monkeypatch):
    import kubetune.register

    monkeypatch.setattr(kubetune.register, "champion_data_fingerprint", lambda cfg: None)
    cfg = from_dict({})
    prepared = write_stage(tmp_path / "prepared", "prepare", "a" * 64)
    with pytest.raises(UserError, match="pipeline parameter `accelerator`: 'GPU' is not one of cpu, gpu"):
        runtime.decide(cfg, prepared, force=False, accelerator="GPU")
    packed = write_stage(tmp_path / "packed", "pack", "c" * 64)
    with pytest.raises(UserError, match="is a `pack` output"):
        runtime.decide(cfg, packed, force=False, accelerator="cpu")


def test_registration_markdown():
    text = runtime.registration_markdown(
        {
            "status": "registered",
            "model_name": "kubetune-x",
            "version": "3",
            "promotion": "rejected",
            "promotion_reason": "no gain | 0.0",
            "champion_version": "2",
            "error": None,
        }
    )
    assert "| version | 3 |" in text and "| promotion | rejected |" in text
    assert "no gain / 0.0" in text  # a pipe would break the table
    assert "error" not in text


def test_runtime_imports_neither_kfp_nor_mlflow():
    import subprocess
    import sys

    code = (
        "import sys, components.runtime, components.params; "
        "print(any(m == 'kfp' or m.startswith(('kfp.', 'mlflow')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_fake_artifact_matches_kfp(tmp_path):
    """The fakes above use the same attributes as KFP's artifacts."""
    from kfp.dsl import Metrics

    metrics = Metrics(uri=str(tmp_path / "m"))
    runtime.log_metrics(metrics, {"eval_loss": 1.5})
    assert metrics.metadata == {"eval_loss": 1.5}
