"""The `kubetune` command restarts itself under tcmalloc for the stages that load a model, and says so in the
training summary; ``KUBETUNE_ALLOCATOR=system`` keeps the C library's malloc. Real processes.

Where tcmalloc is installed the real one is preloaded. Where it is not (CI machines may lack it), a stand-in is:
a copy of the C maths library under tcmalloc's file name, found through ``LD_LIBRARY_PATH`` as an installed
tcmalloc would be. It exercises the same restart, preload and ``/proc/self/maps`` check; the process's malloc then
stays glibc's (the stand-in replaces nothing), which the train stage cannot tell apart by name, so the stand-in
only ever stands in for the mechanism, never for a speed or memory figure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kubetune.cpu import allocator as malloc

from .procs import env, kubetune_cmd

pytestmark = pytest.mark.reliability


def _libm() -> str:
    with open("/proc/self/maps", encoding="utf-8") as fh:
        return next(line.split(None, 5)[5].strip() for line in fh if "/libm.so" in line or "/libm-" in line)


@pytest.fixture
def tcmalloc_env(tmp_path) -> tuple[dict[str, str], str]:
    """The environment to run `kubetune` in, and the tcmalloc library it should end up running with."""
    e = env()
    e.pop("LD_PRELOAD", None)
    e.pop(malloc.ALLOCATOR_ENV, None)
    real = malloc.find_tcmalloc(e)
    if real:
        return e, real
    if not Path("/proc/self/maps").is_file():
        pytest.skip("no /proc here")
    folder = tmp_path / "lib"
    folder.mkdir()
    stand_in = folder / malloc.TCMALLOC_NAMES[0]
    shutil.copyfile(_libm(), stand_in)
    e["LD_LIBRARY_PATH"] = f"{folder}:{e['LD_LIBRARY_PATH']}" if e.get("LD_LIBRARY_PATH") else str(folder)
    return e, str(stand_in)


def _train(ws, tmp_path, name: str, e: dict[str, str]) -> dict:
    out = tmp_path / name
    args = ws.train_args(out, tmp_path / f"{name}-ckpt", "--set", "train.max_steps=2")
    r = subprocess.run(kubetune_cmd(*args), env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((out / "training_summary.json").read_text())["settings"]["allocator"]


def test_train_runs_under_tcmalloc_and_system_opts_out(ws, tmp_path, tcmalloc_env):
    e, lib = tcmalloc_env
    allocator = _train(ws, tmp_path, "auto", e)
    assert allocator["value"] == "tcmalloc", allocator
    assert "preloaded by kubetune" in allocator["reason"]
    # what /proc/self/maps shows is the resolved file (a versioned name behind the .so.4 link)
    assert os.path.realpath(lib) in allocator["reason"] or lib in allocator["reason"]

    allocator = _train(ws, tmp_path, "system", {**e, malloc.ALLOCATOR_ENV: "system"})
    assert allocator["value"] not in ("tcmalloc", "jemalloc", "mimalloc"), allocator


def test_a_wrong_allocator_choice_is_one_line_and_exit_2(ws, tmp_path):
    r = subprocess.run(
        kubetune_cmd(*ws.train_args(tmp_path / "a", tmp_path / "c")),
        env={**env(), malloc.ALLOCATOR_ENV: "tcmalloc-please"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "kubetune: error: KUBETUNE_ALLOCATOR='tcmalloc-please' is not an allocator choice: use auto (tcmalloc "
        "where installed), tcmalloc (required) or system (the C library's malloc)"
    )
    assert not (tmp_path / "a").exists()
