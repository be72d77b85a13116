"""The package builds quietly and ships every module and data file (what the images and `pip install` get)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.infra


@pytest.fixture(scope="module")
def wheel_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources, so that the build's own folders (build/, *.egg-info) never land in the checkout.
    src = out / "src"
    ignore = {".git", ".venv", ".venv-infra", ".venv-infra-hcl2", "build", "runs"}
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in ignore or n.endswith(".egg-info")])
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (out / "dist").glob("kubetune-*.whl")
    return wheel, result.stdout + result.stderr


def test_the_build_prints_no_setuptools_warnings(wheel_build):
    _, output = wheel_build
    assert "Warning" not in output.replace("WARNING: Location", ""), output[-4000:]


def test_the_wheel_ships_every_module_and_data_file(wheel_build):
    wheel, _ = wheel_build
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {"kubetune/py.typed"}
    for top, folder in (
        ("kubetune", ROOT / "src" / "kubetune"),
        ("pipelines", ROOT / "pipelines"),
        ("components", ROOT / "components"),
    ):
        for path in folder.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".jinja"):
                expected.add(f"{top}/{path.relative_to(folder).as_posix()}")
    assert expected - shipped == set()
    assert {"kubetune/chat_templates/qa.jinja", "kubetune/chat_templates/chatml.jinja"} <= shipped
