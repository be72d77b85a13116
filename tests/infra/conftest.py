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
import stat
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
TF_ROOT = ROOT / "terraform"
TF_FILES = sorted(TF_ROOT.rglob("*.tf"))


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


def make(*args: str, path: str | None = None, stdin: str | None = None, extra_env: dict | None = None):
    """``make ARGS`` in the repository root with the deploy settings cleared from the environment."""
    exe = shutil.which("make")
    if exe is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("TAG", "PROJECT_ID", "MAKEFLAGS", "MFLAGS", "HF_TOKEN")}
    if path is not None:
        env["PATH"] = path
    env.update(extra_env or {})
    return subprocess.run(
        [exe, "--no-print-directory", *args],
        cwd=ROOT,
        env=env,
        input=stdin or "",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def fake_bin(tmp_path: Path, scripts: dict[str, str]) -> str:
    """A folder of executable bash scripts (name -> body) to put first on PATH in place of real tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(bin_dir)


def render(overlay_dir: Path) -> list[dict]:
    """``kubectl kustomize`` of a kustomization folder, as a list of objects."""
    result = run([binary("kubectl"), "kustomize", overlay_dir])
    assert result.returncode == 0, f"kustomize {overlay_dir} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


_KUBERNETES_VALIDATE = """
import json, sys
import kubernetes_validate
errors = []
for doc in json.load(open(sys.argv[1])):
    # Kubeflow Trainer's kinds have no schema here: tests/infra/test_trainer.py validates them.
    if not doc or doc.get("apiVersion", "").startswith("trainer.kubeflow.org/"):
        continue
    try:
        kubernetes_validate.validate(doc, sys.argv[2], strict=True)
    except Exception as e:
        errors.append(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {e}")
print(json.dumps(errors))
"""


def kubernetes_validate(objects: list[dict], tmp_path: Path, name: str = "objects") -> list[str]:
    """kubernetes-validate (in .venv-infra, strict) of ``objects`` against Kubernetes K8S_VERSION: one line per
    object it refuses, empty when all validate."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(objects))
    result = run([venv_tool(INFRA_VENV, "python"), "-c", _KUBERNETES_VALIDATE, path, K8S_VERSION])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


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
        assert len(reason.strip()) > 15, f"{check['check_id']} in {check['file_path']} is skipped without a reason"


_HCL_DUMP = """
import json, sys
import hcl2
out = {}
for path in sys.argv[1:]:
    try:
        with open(path) as f:
            out[path] = hcl2.load(f)
    except Exception as e:
        sys.exit(f"{path}: does not parse: {e}")
print(json.dumps(out))
"""


def _hcl_clean(value):
    """python-hcl2 8 keeps literal quotes and adds comment metadata; strip both."""
    if isinstance(value, dict):
        return {_hcl_clean(k): _hcl_clean(v) for k, v in value.items() if k not in ("__comments__", "__is_block__")}
    if isinstance(value, list):
        return [_hcl_clean(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


@pytest.fixture(scope="session")
def parsed() -> dict[Path, dict]:
    """Every .tf file under terraform/, parsed by python-hcl2 (its own venv), by path relative to the root."""
    python = venv_tool(HCL_VENV, "python")
    result = run([python, "-c", _HCL_DUMP, *TF_FILES])
    assert result.returncode == 0, result.stderr
    return {Path(p).relative_to(ROOT): _hcl_clean(tree) for p, tree in json.loads(result.stdout).items()}


def tf_blocks(parsed: dict[Path, dict], folder: str, kind: str) -> dict[str, dict]:
    """All blocks of ``kind`` (variable, output, locals...) in a folder, by name."""
    out: dict[str, dict] = {}
    for path, tree in parsed.items():
        if path.parent == Path("terraform") / folder:
            for block in tree.get(kind, []):
                out.update(block)
    return out


def tf_resources(parsed: dict[Path, dict], folder: str, rtype: str) -> dict[str, dict]:
    """All resources of type ``rtype`` in a folder, by name."""
    out: dict[str, dict] = {}
    for path, tree in parsed.items():
        if path.parent == Path("terraform") / folder:
            for block in tree.get("resource", []):
                out.update(block.get(rtype, {}))
    return out
