"""Pipeline arguments from a config file, and the CLI's handling of local commands and bad input."""

from __future__ import annotations

import pytest
import yaml

from components.params import CONFIG_KEYS, PARAMS
from components.runtime import build_config
from kubetune.config import load
from kubetune.errors import UserError
from pipelines import cli
from pipelines.arguments import check_for_cluster, load_config, pipeline_arguments


def test_arguments_rebuild_exactly_the_config(config_file):
    """What a component builds from the arguments is the config the file (plus --set) describes."""
    overrides = ["lora.alpha=12", "train.learning_rate=0.0003", "eval.max_new_tokens=16"]
    raw, cfg = load_config(config_file, overrides)
    arguments = pipeline_arguments(raw, cfg, accelerator="gpu", checkpoint_root="/mnt/c", force=True)
    named = {name: arguments[name] for name in CONFIG_KEYS}
    rebuilt = build_config(arguments["config_yaml"], arguments["overrides"], **named)
    assert rebuilt == load(config_file, overrides)
    assert set(arguments) == {p.name for p in PARAMS}
    assert arguments["accelerator"] == "gpu" and arguments["force"] is True
    assert arguments["checkpoint_root"] == "/mnt/c" and arguments["refresh_data"] is False


def test_train_nodes_defaults_to_one_and_must_be_a_node_count(config_file):
    raw, cfg = load_config(config_file)
    assert pipeline_arguments(raw, cfg)["train_nodes"] == 1
    assert pipeline_arguments(raw, cfg, train_nodes=8)["train_nodes"] == 8
    for bad in (0, -2, True, 1.5):
        with pytest.raises(UserError, match="--train-nodes"):
            pipeline_arguments(raw, cfg, train_nodes=bad)


def test_named_keys_leave_config_yaml(config_file):
    raw, cfg = load_config(config_file, ["lora.dropout=0.0"])
    arguments = pipeline_arguments(raw, cfg)
    rest = yaml.safe_load(arguments["config_yaml"])
    assert rest == {
        "data": {"max_rows": 2000},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "train": {"batch_size": 8},
    }
    assert arguments["lora_dropout"] == 0.0 and arguments["lora_r"] == 8 and arguments["eval_size"] == 100.0
    assert arguments["mlflow_tracking_uri"] == "http://mlflow.kubetune.svc:5000"
    assert arguments["registered_model"] == ""  # unset: the component keeps the library's default name
    assert arguments["overrides"] == []


def test_a_config_of_named_keys_only_sends_an_empty_config_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: org/m}\ndata: {path: org/d}\nlora: {r: 4}\n")
    raw, cfg = load_config(path)
    assert pipeline_arguments(raw, cfg)["config_yaml"] == ""


def test_missing_model_or_data_is_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: org/m}\n")
    code = cli.main(["run", "--local", "--config", str(path), "--root", str(tmp_path / "root")])
    err = capsys.readouterr().err
    assert code == 2
    assert "config key `data.path`: empty" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "root" / "kfp").exists()


def test_cluster_checks(config_file, tmp_path):
    _, cfg = load_config(config_file)
    assert check_for_cluster(cfg) == []
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n")
    _, cfg = load_config(config_file, [f"data.path={data}"])
    (warning,) = check_for_cluster(cfg)
    assert "data.path" in warning and "the pods must see it at the same path" in warning


def test_run_needs_local(config_file, capsys):
    assert cli.main(["run", "--config", str(config_file)]) == 2
    assert "needs --local" in capsys.readouterr().err


def test_run_with_a_missing_config_file(tmp_path, capsys):
    assert cli.main(["run", "--local", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: not found" in capsys.readouterr().err


def test_bad_accelerator_is_a_usage_error(config_file, capsys):
    assert cli.main(["run", "--local", "--config", str(config_file), "--accelerator", "tpu"]) == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_compile_command_writes_the_images_it_was_given(tmp_path, capsys):
    out = tmp_path / "build" / "p.yaml"
    code = cli.main(
        [
            "compile",
            "--out",
            str(out),
            "--cpu-image",
            "reg.example/a/cpu@sha256:" + "0" * 64,
            "--gpu-image",
            "reg.example:5000/a/gpu:7",
        ]
    )
    assert code == 0
    text = out.read_text()
    assert "image: reg.example/a/cpu@sha256:" + "0" * 64 in text
    assert "image: reg.example:5000/a/gpu:7" in text
    assert str(out) in capsys.readouterr().out


def test_compile_defaults_to_local_image_names(tmp_path):
    from kubetune.artifacts import version

    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "--out", str(out)]) == 0
    tag = version().replace("+", "-")
    assert f"image: kubetune-cpu:{tag}" in out.read_text() and f"image: kubetune-gpu:{tag}" in out.read_text()


def test_compile_refuses_a_bad_image_reference(tmp_path, capsys):
    code = cli.main(["compile", "--out", str(tmp_path / "p.yaml"), "--gpu-image", "Kubetune GPU"])
    assert code == 2
    assert "--gpu-image 'Kubetune GPU': not an image reference" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_kubetune_cli_forwards_to_the_pipeline_cli(tmp_path):
    from kubetune.cli import main

    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--out", str(out)]) == 0
    assert out.is_file()


def test_docs_list_every_parameter():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "pipeline.md").read_text()
    missing = [p.name for p in PARAMS if f"`{p.name}`" not in docs]
    assert missing == []
