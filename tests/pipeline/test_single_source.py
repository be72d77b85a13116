"""Each parameter, default and stage is defined once: the compiled pipeline, the component signatures and bodies, and
`kubetune run` all agree with ``components.params`` (its defaults with ``kubetune.config.Config``) and
``kubetune.dag``."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

from components import stages
from components.params import BY_NAME, CONFIG_KEYS, LIBRARY, PARAMS, defaults
from kubetune import dag
from kubetune.config import Config

KFP_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN", list: "LIST"}
BODIES = (stages.prepare, stages.check_unchanged, stages.pack, stages.train, stages.evaluate, stages.register)


def _library_default(key: str):
    value = Config()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def test_a_config_parameter_defaults_to_the_config_unless_it_is_a_named_form_preset():
    form = defaults()
    presets = {p.name for p in PARAMS if p.form is not LIBRARY}
    assert presets & set(CONFIG_KEYS) == {"model", "dataset", "max_steps", "eval_size"}
    for name, key in CONFIG_KEYS.items():
        if name in presets:
            continue
        library = _library_default(key)
        assert form[name] == ("" if library is None else library), name
        assert isinstance(form[name], BY_NAME[name].type), name
    assert form["learning_rate"] == Config().train.learning_rate == 1e-4


def test_compiled_defaults_and_types_are_the_tables(spec):
    pipeline_spec, _ = spec
    inputs = pipeline_spec["root"]["inputDefinitions"]["parameters"]
    form = defaults()
    assert list(inputs) == sorted(p.name for p in PARAMS)
    for p in PARAMS:
        assert inputs[p.name]["parameterType"] == KFP_TYPES[p.type], p.name
        assert inputs[p.name]["defaultValue"] == form[p.name], p.name
    assert inputs["learning_rate"]["defaultValue"] == 1e-4


@pytest.mark.parametrize("body", BODIES, ids=lambda f: f.__name__)
def test_component_signatures_use_the_parameter_types(body):
    for name, param in inspect.signature(body).parameters.items():
        if name in BY_NAME:
            assert param.annotation in (BY_NAME[name].type, BY_NAME[name].type.__name__), (body.__name__, name)


@pytest.mark.parametrize("body", BODIES, ids=lambda f: f.__name__)
def test_each_body_builds_its_config_from_every_config_parameter_it_takes(body):
    """What ``locals()`` did implicitly: a config parameter in the signature that the body does not pass on would
    be silently ignored."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(body)))
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "config_from"
    ]
    assert len(calls) == 1, body.__name__
    (call,) = calls
    assert [a.id for a in call.args] == ["config_yaml", "overrides"]
    passed = {kw.arg for kw in call.keywords if kw.arg != "extra"}
    assert all(isinstance(kw.value, ast.Name) and kw.value.id == kw.arg for kw in call.keywords if kw.arg != "extra")
    taken = set(inspect.signature(body).parameters) & set(CONFIG_KEYS)
    assert passed == taken, body.__name__


@pytest.mark.parametrize("stage", dag.STAGES, ids=lambda s: s.name)
def test_component_artifacts_are_the_dags(stage):
    body = getattr(stages, stage.name)
    params = inspect.signature(body).parameters
    artifact_inputs = [n for n, p in params.items() if "InputAnnotation" in str(p.annotation)]
    assert sorted(artifact_inputs) == sorted(dag.BY_NAME[i].artifact for i in stage.inputs)
    assert stage.artifact in params and "OutputAnnotation" in str(params[stage.artifact].annotation)


def test_compiled_tasks_read_the_artifacts_the_dag_names(spec):
    pipeline_spec, _ = spec
    tasks = {}

    def walk(component):
        for name, task in (pipeline_spec["components"][component].get("dag", {}).get("tasks", {})).items():
            tasks[name] = task
            walk(task["componentRef"]["name"])

    tasks.update(pipeline_spec["root"]["dag"]["tasks"])
    for task in list(tasks.values()):
        walk(task["componentRef"]["name"])
    for stage in dag.STAGES[1:]:
        names = [n for n in tasks if n == stage.name or n.startswith(stage.name + "-")]
        assert names, stage.name
        for name in names:
            artifacts = set(tasks[name].get("inputs", {}).get("artifacts", {}))
            assert artifacts == {dag.BY_NAME[i].artifact for i in stage.inputs}, name
