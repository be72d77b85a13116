"""Dockerfiles: hadolint and checkov clean, bases pinned by digest, non-root, and pins from the one source."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from .conftest import INFRA_VENV, ROOT, assert_clean, checkov, run, venv_tool

pytestmark = pytest.mark.infra

IMAGES = ROOT / "images"
DOCKERFILE = IMAGES / "Dockerfile"
TEXT = DOCKERFILE.read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME_TARGETS = ("cpu", "gpu", "mlflow")  # what `make images` pushes
BASE_ARGS = {"PYTHON_BASE", "CUDA_BASE"}


def _stages() -> dict[str, tuple[str, str]]:
    """Stage name -> (what its FROM names, its text up to the next FROM)."""
    parts = re.split(r"^(?=FROM\s)", TEXT, flags=re.M)[1:]
    stages = {}
    for part in parts:
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", part)
        assert m, f"images/Dockerfile: every stage is named (FROM ... AS name): {part.splitlines()[0]}"
        stages[m.group(2)] = (m.group(1), part)
    return stages


STAGES = _stages()


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


def test_one_dockerfile_with_the_pushed_images_as_targets():
    assert sorted(p.relative_to(IMAGES).as_posix() for p in IMAGES.rglob("*Dockerfile*")) == ["Dockerfile"]
    assert set(RUNTIME_TARGETS) <= set(STAGES)
    # cpu is the last stage: a build without --target gets the CPU image
    assert list(STAGES)[-1] == "cpu"


def test_hadolint():
    result = run([venv_tool(INFRA_VENV, "hadolint"), DOCKERFILE])
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_dockerfiles_are_clean():
    assert_clean(checkov(IMAGES, "dockerfile"))


def test_bases_are_build_args_whose_defaults_are_pinned_by_tag_and_digest():
    defaults = dict(re.findall(r"^ARG\s+(\w+_BASE)=(\S+)$", TEXT, flags=re.M))
    assert set(defaults) == BASE_ARGS
    for name, ref in defaults.items():
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", ref), (
            f"{name}={ref} is not pinned by tag and digest"
        )
    assert defaults["PYTHON_BASE"].startswith("python:3.11.")
    assert defaults["CUDA_BASE"].startswith("nvidia/cuda:")
    # the base ARGs come before the first FROM (global), and every FROM is one of them or an earlier stage
    first_from = TEXT.index("\nFROM ")
    assert TEXT.index("ARG PYTHON_BASE=") < first_from and TEXT.index("ARG CUDA_BASE=") < first_from
    # GPU_PYTHON names the GPU interpreter's stage: python-build-standalone unless a local check overrides it
    assert re.search(r"^ARG GPU_PYTHON=gpu-python$", TEXT[:first_from], flags=re.M)
    assert STAGES["gpu-deps"][0] == "${GPU_PYTHON}" and "uv python install" in STAGES["gpu-python"][1]
    seen: list[str] = []
    for name, (base, _) in STAGES.items():
        allowed = {f"${{{a}}}" for a in BASE_ARGS} | {"${GPU_PYTHON}"}
        assert base in allowed or base in seen, f"stage {name}: FROM {base}"
        seen.append(name)
    assert STAGES["gpu"][0] == "${CUDA_BASE}"
    assert STAGES["cpu"][0] == STAGES["mlflow"][0] == "${PYTHON_BASE}"


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
def test_runtime_targets_run_as_non_root_and_install_nothing(target):
    text = STAGES[target][1]
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage must run as a non-root user"
    assert "pip install" not in text, "packages are installed in the build stages and copied"
    assert re.search(r"^COPY --from=\S+ /opt/venv", text, flags=re.M), "the venv comes from a build stage"


def test_no_compiler_in_runtime_stages_beyond_what_torch_compile_needs():
    compilers = {"gcc", "g++", "clang", "build-essential", "make", "cmake"}

    def apt_packages(text: str) -> set[str]:
        found = set()
        for line in re.findall(r"apt-get install[^&]*", text):
            found |= set(line.split()) - {"apt-get", "install", "-y", "--no-install-recommends", "\\"}
        return found

    # Inductor (torch.compile on CPU) compiles C++ at run time; Triton (on GPU) a small C launcher
    assert apt_packages(STAGES["cpu"][1]) & compilers == {"g++"}
    assert apt_packages(STAGES["gpu"][1]) & compilers == {"gcc"}
    assert apt_packages(STAGES["mlflow"][1]) & compilers == set()
    assert "apt-get" not in STAGES["mlflow"][1]


def test_torch_build_args_default_to_the_pyproject_pin_and_the_cpu_index():
    torch = _pins()["torch"]
    versions = re.findall(r"^ARG TORCH_VERSION=(\S+)$", TEXT, flags=re.M)
    assert versions and set(versions) == {torch}
    assert re.search(r"^ARG TORCH_VERSION=", STAGES["cpu-deps"][1], flags=re.M)
    assert re.search(r"^ARG TORCH_VERSION=", STAGES["gpu-deps"][1], flags=re.M)
    cpu_deps = STAGES["cpu-deps"][1]
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", cpu_deps, flags=re.M)
    assert 'pip install --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}+cpu"' in cpu_deps
    # the CPU torch is installed before anything that depends on it, so PyPI's CUDA build is never pulled
    assert cpu_deps.index("torch==${TORCH_VERSION}+cpu") < cpu_deps.index("-r /spec/requirements.txt")


def test_requirements_come_from_pyproject_and_the_constraints():
    spec = STAGES["spec"][1]
    assert "COPY pyproject.toml /spec/pyproject.toml" in spec and "['dependencies']" in spec
    assert "['optional-dependencies']['gpu']" in spec
    for stage in ("cpu-deps", "gpu-deps", "mlflow-deps"):
        installs = re.findall(r"pip install -c /spec/constraints\.txt[^\n]*", STAGES[stage][1])
        assert installs, f"{stage} installs through images/constraints.txt"
        assert "pip check" in STAGES[stage][1]
    assert "-r /spec/requirements-gpu.txt" in STAGES["gpu-deps"][1]
    assert "-r /spec/requirements-mlflow.txt" in STAGES["mlflow-deps"][1]


def test_code_is_a_layer_after_the_stack():
    """A code-only change rebuilds only the app stages: the deps stages copy nothing from src/, pipelines/ or
    components/, and the runtime copies the app's small prefix after the venv."""
    for stage in ("spec", "cpu-deps", "gpu-python", "gpu-python-base", "gpu-deps", "mlflow-deps"):
        assert not re.search(r"^COPY (src|pipelines|components)\b", STAGES[stage][1], flags=re.M), stage
    for app, runtime in (("cpu-app", "cpu"), ("gpu-app", "gpu")):
        assert "--no-deps" in STAGES[app][1] and "--prefix=/opt/kubetune" in STAGES[app][1]
        text = STAGES[runtime][1]
        deps, code = (
            text.index(f"COPY --from={runtime}-deps /opt/venv"),
            text.index(f"COPY --from={app} /opt/kubetune/"),
        )
        assert deps < code


def test_gpu_target_installs_the_gpu_extra_and_checks_bitsandbytes():
    assert "import torch, bitsandbytes" in STAGES["gpu-app"][1] and "torch.version.cuda" in STAGES["gpu-app"][1]


def test_no_ipex_image():
    """IPEX is end-of-life and kubetune refuses train.ipex (docs/infrastructure.md, "No IPEX"): no image carries it."""
    assert "intel-extension-for-pytorch" not in TEXT and "ipex" not in TEXT.lower()
    assert not list(IMAGES.glob("*ipex*"))
    assert "ipex" not in (ROOT / "mk" / "infra.mk").read_text().lower()


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
        assert "--file=images/Dockerfile" in step["args"] and f"--target={name}" in step["args"]
        assert f"docker build --file images/Dockerfile --target {name} " in make
    cpu = next(s for s in config["steps"] if s["id"] == "cpu")
    assert "--build-arg=TORCH_INDEX_URL=${_TORCH_INDEX_URL}" in cpu["args"]
    assert config["substitutions"]["_TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


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

    final = STAGES["cpu"][1]
    env = dict(re.findall(r"^\s*(LD_PRELOAD|KUBETUNE_PRELOADED_ALLOCATOR|TCMALLOC_\w+)=(\S+?)\s*\\?$", final, re.M))
    assert env["LD_PRELOAD"] == env[allocator.PRELOADED_BY_ENV] == allocator.TCMALLOC_NAMES[0]
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    assert "libtcmalloc-minimal4" in final  # the Debian package that ships libtcmalloc_minimal.so.4
    assert allocator._same_library(env["LD_PRELOAD"], "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10")
