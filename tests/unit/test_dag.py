"""The stage table: its order, what each stage reads, and that `kubetune run` and the stage commands follow it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune import cli, dag
from kubetune.config import Config


def test_stages_in_order_and_each_reads_only_earlier_stages():
    assert [s.name for s in dag.STAGES] == ["prepare", "pack", "train", "evaluate", "register"]
    seen: set[str] = set()
    for stage in dag.STAGES:
        assert set(stage.inputs) <= seen, stage.name
        seen.add(stage.name)
    assert len({s.folder for s in dag.STAGES}) == len({s.artifact for s in dag.STAGES}) == len(dag.STAGES)


def test_folders_under_the_output_dir(tmp_path):
    assert dag.folders(tmp_path) == {
        "prepare": tmp_path / "prepared",
        "pack": tmp_path / "packed",
        "train": tmp_path / "adapter",
        "evaluate": tmp_path / "eval",
        "register": tmp_path / "registered",
    }


def test_a_stage_without_its_inputs_is_a_programming_error(tmp_path):
    with pytest.raises(TypeError, match="evaluate needs the outputs of pack, prepare"):
        dag.run(dag.BY_NAME["evaluate"], Config(), {"train": tmp_path}, tmp_path / "eval")


@pytest.mark.parametrize("stage", dag.STAGES, ids=lambda s: s.name)
def test_each_stage_command_takes_the_folders_of_what_it_reads(stage):
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[stage.name]
    options = {o for a in sub._actions for o in a.option_strings}
    for name in stage.inputs:
        assert f"--{dag.BY_NAME[name].option}" in options
    assert "--out" in options
    assert ("--data" in options) == (not stage.inputs)


def _record(monkeypatch) -> list[tuple[str, dict[str, Path], Path, bool]]:
    calls = []

    def fake_run(stage, cfg, inputs, out, *, overwrite=False, hw=None, world=None):
        calls.append((stage.name, dict(inputs), out, hw is not None))
        return out

    monkeypatch.setattr(dag, "run", fake_run)
    monkeypatch.setattr(cli, "machine", lambda: object())
    return calls


@pytest.mark.parametrize("tracking", [True, False])
def test_run_all_follows_the_table(monkeypatch, tmp_path, tracking):
    calls = _record(monkeypatch)
    cfg = Config().replace(**{"output_dir": str(tmp_path), "tracking.enabled": tracking})
    out = cli.run_all(cfg)
    d = dag.folders(tmp_path)
    assert out == d
    expected = [s for s in dag.STAGES if tracking or s.name != "register"]
    assert [c[0] for c in calls] == [s.name for s in expected]
    for (name, inputs, dest, with_hw), stage in zip(calls, expected, strict=True):
        assert inputs == {i: d[i] for i in stage.inputs}
        assert dest == d[name]
        assert with_hw == (name == "train")  # the machine's facts are detected for training only


def test_a_stage_command_runs_its_stage_on_the_given_folders(monkeypatch, tmp_path, capsys):
    calls = _record(monkeypatch)
    rc = cli.main(
        [
            "register",
            "--set",
            f"output_dir={tmp_path}",
            "--eval-report",
            str(tmp_path / "e"),
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert rc == 0
    ((name, inputs, dest, with_hw),) = calls
    assert name == "register" and dest == tmp_path / "r" and not with_hw
    assert inputs == {
        "train": tmp_path / "adapter",
        "evaluate": tmp_path / "e",
        "pack": tmp_path / "packed",
        "prepare": tmp_path / "prepared",
    }
    assert f"register: done -> {tmp_path / 'r'}" in capsys.readouterr().out


def test_the_library_reaches_the_pipeline_commands_through_its_entry_point():
    from importlib.metadata import entry_points

    (command,) = entry_points(group="kubetune.commands", name="pipeline")
    (script,) = entry_points(group="console_scripts", name="kubetune-pipeline")
    assert command.value == script.value == "pipelines.cli:main"
    for path in Path(cli.__file__).parent.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "__import__(" not in text, path
        assert "from pipelines" not in text and "import pipelines" not in text, path


def test_a_missing_pipeline_command_is_one_line(monkeypatch, capsys):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: ())
    assert cli.main(["pipeline", "compile"]) == 2
    err = capsys.readouterr().err
    assert "kubetune pipeline: not in this installation: reinstall kubetune" in err
    assert len(err.strip().splitlines()) == 1
