"""Run the pipeline on this machine through kfp.local: the same components, the same graph, no cluster.

``kfp.local.SubprocessRunner(use_venv=False)`` runs each component as a subprocess of this Python (the
kubetune package must be importable, as it is in the project's venv). What differs from a cluster run:
kfp.kubernetes settings (pools, resources, Secret, ConfigMap, PVC) are ignored, there is no KFP cache (every
run executes every step) and no retries; artifacts land under
``<root>/kfp/<pipeline>-<timestamp>/<task>/<output>``.

kfp 2.17.3's local orchestrator resolves ``dsl.OneOf`` for parameters but not for artifacts (it insists on one
artifact selector per DAG output), and the pipeline picks its adapter and its prepared data with
``dsl.OneOf``. :func:`_oneof_artifacts` teaches it, for the duration of a local run, to take the branch that
produced the artifact, as the KFP backend does; tests/pipeline checks that the patch is still needed and still
enough.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune import dag
from kubetune.config import merge
from pipelines.arguments import load_config, pipeline_arguments


@contextlib.contextmanager
def _oneof_artifacts() -> Iterator[None]:
    from kfp.local.orchestrator import orchestrator_utils

    utils = orchestrator_utils.OrchestratorUtils
    original = utils.__dict__["get_dag_output_artifacts"]

    def get_dag_output_artifacts(cls, dag_outputs_spec, io_store) -> dict[str, Any]:
        outputs = {}
        for key, spec in dag_outputs_spec.artifacts.items():
            found = []
            for selector in spec.artifact_selectors:
                try:
                    found.append(io_store.get_task_output(selector.producer_subtask, selector.output_artifact_key))
                except (KeyError, ValueError):
                    continue  # that branch did not run
            if len(found) != 1:
                raise ValueError(
                    f"DAG output {key!r}: {len(found)} of {len(spec.artifact_selectors)} branches "
                    "produced it; expected exactly one"
                )
            outputs[key] = found[0]
        return outputs

    utils.get_dag_output_artifacts = classmethod(get_dag_output_artifacts)
    try:
        yield
    finally:
        utils.get_dag_output_artifacts = original


class LocalRunFailed(RuntimeError):
    """A step of the local run failed; its log was printed above. Exit code 1."""


@dataclass
class LocalRun:
    """What a local run left behind."""

    run_dir: Path
    verdict: str | None
    outputs: dict[str, Path] = field(default_factory=dict)  # "<task>/<output>" -> path
    registration: dict[str, Any] | None = None
    promotion: str | None = None


def _task_parameters(task_dir: Path) -> dict[str, Any]:
    out = task_dir / "executor_output.json"
    if not out.is_file():
        return {}
    return json.loads(out.read_text()).get("parameterValues", {}) or {}


def collect(run_dir: Path) -> LocalRun:
    """Read a finished local run's folder: artifacts by task, the data verdict, the registration."""
    outputs: dict[str, Path] = {}
    for task_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        for item in sorted(task_dir.iterdir()):
            if item.name == "executor_output.json" or item.name.startswith(".") or ".tmp-" in item.name:
                continue
            outputs[f"{task_dir.name}/{item.name}"] = item
    verdict = _task_parameters(run_dir / "check-unchanged").get("Output")
    registration = None
    register = dag.BY_NAME["register"]
    reg_file = run_dir / register.name / register.artifact / "registration.json"
    if reg_file.is_file():
        registration = json.loads(reg_file.read_text())
    promotion = _task_parameters(run_dir / register.name).get("Output")
    return LocalRun(run_dir=run_dir, verdict=verdict, outputs=outputs, registration=registration, promotion=promotion)


def run_local(
    config: str | Path,
    overrides: list[str] | None = None,
    *,
    root: str | Path,
    accelerator: str = "cpu",
    force: bool = False,
    refresh_data: bool = False,
) -> LocalRun:
    """Run the whole pipeline locally on ``config``; everything it writes goes under ``root``.

    ``root/kfp/`` holds the pipeline runs, ``root/checkpoints/<run id>/`` the training checkpoints, and, when
    the config names no tracking URI and MLFLOW_TRACKING_URI is unset, ``root/mlflow.db`` the MLflow store
    (the config's ``output_dir`` is set to ``root``).
    """
    from kfp import local

    from pipelines.sft_pipeline import PIPELINE_NAME, build_pipeline

    root = Path(root).expanduser().resolve()
    raw, cfg = load_config(config, overrides)
    raw = merge(raw, {"output_dir": str(root)})
    cfg = cfg.replace(output_dir=str(root))
    arguments = pipeline_arguments(
        raw,
        cfg,
        accelerator=accelerator,
        checkpoint_root=str(root / "checkpoints"),
        force=force,
        refresh_data=refresh_data,
    )
    pipeline = build_pipeline()
    runs = root / "kfp"
    runs.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in runs.iterdir()}
    with _oneof_artifacts(), warnings.catch_warnings():
        # The images are cluster references; locally each step runs in this Python, which kfp warns about.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        # ... and that placement, resources and display names do nothing here, as the module docstring says.
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*", category=UserWarning)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(runs), raise_on_error=True)
        try:
            pipeline(**arguments)
        except RuntimeError as err:
            if "finished with status" not in str(err):
                raise
            new = sorted(p for p in runs.iterdir() if p.name not in before)
            where = f"; outputs so far under {new[-1]}" if new else ""
            raise LocalRunFailed(f"local pipeline run failed: {_plain(str(err))} (its log is above){where}") from None
    new = sorted(p for p in runs.iterdir() if p.name not in before and p.name.startswith(PIPELINE_NAME))
    if not new:
        raise LocalRunFailed(f"the local run left no folder under {runs}")
    return collect(new[-1])


def _plain(text: str) -> str:
    """Drop the terminal colour codes kfp.local puts into its messages."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)
