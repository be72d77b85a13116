"""Shared helpers for the offline infrastructure checks.

The check tools live in their own virtual environments (``make infra-tools``): ``.venv-infra`` (checkov,
hadolint, kubernetes-validate) and ``.venv-infra-hcl2`` (python-hcl2), because they conflict with the training
stack and with each other. A missing tool skips its tests with the command that installs it; under CI
(``CI`` set) it fails instead, since CI runs ``make infra-tools`` first. ``kubectl`` and ``terraform`` are
binaries no make target can install: without them, their tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA_VENV = ROOT / ".venv-infra"
HCL_VENV = ROOT / ".venv-infra-hcl2"
OVERLAYS = sorted(p.name for p in (ROOT / "manifests" / "overlays").iterdir() if p.is_dir())
# Schemas of the Kubernetes minor GKE's regular channel runs (kubernetes-validate ships them offline).
K8S_VERSION = "1.34.0"


def venv_tool(venv: Path, name: str) -> Path:
    """Path of ``name`` in ``venv``; skip (fail under CI) when it is not installed."""
    path = venv / "bin" / name
    if path.exists():
        return path
    message = f"{name} is not installed in {venv.name}: run `make infra-tools`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def binary(name: str) -> str:
    """Path of a system binary (kubectl, terraform); skip when absent: no make target can install it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not on PATH: install it to run this check")
    return path


def run(cmd: list[str | Path], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False, **kwargs)


def render(overlay_dir: Path) -> list[dict]:
    """``kubectl kustomize`` of a kustomization folder, as a list of objects."""
    result = run([binary("kubectl"), "kustomize", overlay_dir])
    assert result.returncode == 0, f"kustomize {overlay_dir} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict], kind: str, name: str) -> dict:
    """The object of ``kind`` whose name is ``name`` (or starts with ``name-`` for hashed ConfigMaps)."""
    for obj in objects:
        obj_name = obj["metadata"]["name"]
        if obj["kind"] == kind and (obj_name == name or obj_name.rsplit("-", 1)[0] == name):
            return obj
    raise AssertionError(f"no {kind} {name} among {[(o['kind'], o['metadata']['name']) for o in objects]}")


def checkov(path: Path, framework: str) -> dict:
    """Run checkov offline over ``path``; return its JSON report for ``framework`` (summary and checks)."""
    exe = venv_tool(INFRA_VENV, "checkov")
    result = run(
        [exe, "-d", path, "--framework", framework, "--output", "json", "--skip-download"],
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    assert result.stdout.strip(), f"checkov printed nothing:\n{result.stderr[-2000:]}"
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    for item in reports:
        if item.get("check_type") == framework:
            return item
    # checkov prints a bare summary when a framework found nothing to scan.
    raise AssertionError(f"checkov found nothing to scan for {framework} under {path}: {result.stdout[:500]}")


def assert_clean(report: dict) -> None:
    """Zero failed checks, and every skipped check carries a written reason."""
    failed = report["results"]["failed_checks"]
    assert not failed, "checkov failures:\n" + "\n".join(
        f"{c['check_id']} {c['check_name']} in {c['file_path']} ({c['resource']})" for c in failed
    )
    assert report["summary"]["passed"] > 0
    for check in report["results"]["skipped_checks"]:
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason.strip()) > 15, (
            f"{check['check_id']} in {check['file_path']} is skipped without a reason"
        )
