"""Dockerfiles: hadolint and checkov clean, bases pinned by digest, non-root, and pins from the one source."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from .conftest import INFRA_VENV, ROOT, assert_clean, checkov, run, venv_tool

pytestmark = pytest.mark.infra

IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    pins = {}
    for dep in PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["gpu"]:
        name, version = dep.split("==")
        pins[name.lower()] = version
    return pins


def _constraints() -> dict[str, str]:
    out = {}
    for line in (IMAGES / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            out[name.lower().replace("_", "-")] = version
    return out


def test_the_four_images_exist():
    assert {p.parent.name for p in DOCKERFILES} == {"cpu", "gpu", "cpu-ipex", "mlflow"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint(dockerfile):
    result = run([venv_tool(INFRA_VENV, "hadolint"), dockerfile])
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_dockerfiles_are_clean():
    assert_clean(checkov(IMAGES, "dockerfile"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_multi_stage_digest_pinned_and_non_root(dockerfile):
    text = dockerfile.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(froms) >= 2, "multi-stage: build tools stay in the build stage"
    for ref in froms:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", ref), f"{ref} is not pinned by tag and digest"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage must run as a non-root user"
    # the last stage starts after the last FROM: no compiler toolchain besides what torch.compile needs
    final = text[text.rindex("\nFROM ") :]
    assert "pip install" not in final, "packages are installed in the build stage and copied"


def test_one_python_base_for_all_images():
    refs = {m for p in DOCKERFILES for m in re.findall(r"^FROM\s+(python:\S+)", p.read_text(), flags=re.M)}
    assert len(refs) == 1, refs


def test_torch_build_arg_defaults_equal_the_pyproject_pin():
    torch = _pins()["torch"]
    for name in ("cpu", "gpu"):
        text = (IMAGES / name / "Dockerfile").read_text()
        assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch)}$", text, flags=re.M), name
    assert "download.pytorch.org/whl/cpu" in (IMAGES / "cpu" / "Dockerfile").read_text()
    ipex = (IMAGES / "cpu-ipex" / "Dockerfile").read_text()
    assert re.search(r"^ARG IPEX_TORCH_VERSION=2\.8\.\d+$", ipex, flags=re.M)
    assert re.search(r"^ARG IPEX_VERSION=2\.8\.\d+$", ipex, flags=re.M)


def test_gpu_image_installs_the_gpu_extra_and_cpu_image_keeps_a_compiler():
    gpu = (IMAGES / "gpu" / "Dockerfile").read_text()
    assert '".[gpu]"' in gpu and "nvidia/cuda:" in gpu
    cpu = (IMAGES / "cpu" / "Dockerfile").read_text()
    final = cpu[cpu.rindex("\nFROM ") :]
    assert "g++" in final, "torch.compile needs a C++ compiler at run time"


def test_constraints_carry_every_pyproject_pin():
    constraints = _constraints()
    for name, version in _pins().items():
        assert constraints.get(name) == version, (
            f"images/constraints.txt has {name}=={constraints.get(name)}, "
            f"pyproject.toml pins {version}: run `make constraints`"
        )
    # kfp pins requests and urllib3 exactly; the images must resolve to the same
    assert "requests" in constraints and "urllib3" in constraints


def test_mlflow_image_matches_the_training_stack():
    reqs = (IMAGES / "mlflow" / "requirements.txt").read_text()
    assert f"mlflow[auth]=={_pins()['mlflow']}" in reqs
    assert "psycopg2-binary==" in reqs and "google-cloud-storage==" in reqs


def test_cloudbuild_builds_and_pushes_the_images_make_names():
    config = yaml.safe_load((IMAGES / "cloudbuild.yaml").read_text())
    make = (ROOT / "mk" / "infra.mk").read_text()
    for name in ("cpu", "gpu", "mlflow"):
        assert f"${{_REGISTRY}}/kubetune-{name}:${{_TAG}}" in config["images"]
        assert f"$(REGISTRY)/kubetune-{name}:$(TAG)" in make
        step = next(s for s in config["steps"] if s["id"] == name)
        assert f"--file=images/{name}/Dockerfile" in step["args"]


def test_dockerignore_keeps_local_state_out_of_the_context():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("**") if "**" in lines else -1] == "**", "deny by default"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "src/", "pipelines/", "components/", "images/constraints.txt"} <= allowed
    assert not any(".venv" in a or "build" in a for a in allowed)


def test_cpu_image_runs_every_process_under_tcmalloc_as_the_cli_does():
    """The KFP components run in-process under kfp's executor, not through the `kubetune` command that would restart
    itself under tcmalloc: the CPU image preloads it, by a name the loader finds on any architecture, and marks it
    as kubetune's so the train stage's allocator decision says whose it is."""
    from kubetune.cpu import allocator

    cpu = (IMAGES / "cpu" / "Dockerfile").read_text()
    final = cpu[cpu.rindex("\nFROM ") :]
    env = dict(re.findall(r"^\s*(LD_PRELOAD|KUBETUNE_PRELOADED_ALLOCATOR|TCMALLOC_\w+)=(\S+?)\s*\\?$", final, re.M))
    assert env["LD_PRELOAD"] == env[allocator.PRELOADED_BY_ENV] == allocator.TCMALLOC_NAMES[0]
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    assert "libtcmalloc-minimal4" in final  # the Debian package that ships libtcmalloc_minimal.so.4
    assert allocator._same_library(env["LD_PRELOAD"], "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10")
