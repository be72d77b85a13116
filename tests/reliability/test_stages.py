"""Crash-safe stages: a stage killed half-way leaves nothing the next stage accepts; a re-run with the same inputs
is a no-op that says so; other inputs refuse unless --overwrite. Real processes, `kill -9`."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest

from kubetune.artifacts import read_manifest

from .procs import kubetune_lines, max_abs_diff, run, start, wait_for

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def big_data(tmp_path_factory):
    """150,000 conversations (19 MB): prepare spends a few seconds on them, long enough to be killed half-way."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(150_000):
            q = f"question {i}: what is {i} times {i % 97}?"
            fh.write(json.dumps({"instruction": q, "response": f"it is {i * (i % 97)}. " * 3}) + "\n")
    return path


def only_error(stderr: str) -> str:
    lines = kubetune_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("kubetune: error: "), stderr[-2000:]
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.slow
def test_prepare_killed_half_way_leaves_nothing_usable_and_reruns_cleanly(ws, big_data, tmp_path):
    out = tmp_path / "prepared"
    args = ["prepare", "-c", str(ws.config), "--data", str(big_data), "--out", str(out)]
    proc = start(tmp_path, *args)
    # Half-way: the temp folder exists and rows are being written into it.
    wait_for("prepare to write rows", lambda: any(tmp_path.glob("prepared.tmp-*/*")), proc)
    time.sleep(random.uniform(0.0, 0.3))
    assert proc.popen.poll() is None, "prepare finished before it could be killed"
    proc.signal(signal.SIGKILL)
    proc.wait()
    left = list(tmp_path.glob("prepared.tmp-*"))
    assert left and not out.exists()

    # Neither the missing output nor the killed writer's temp folder is accepted by the next stage.
    for given, needle in ((out, "not found"), (left[0], "incomplete or not a kubetune output")):
        r = run("pack", "-c", str(ws.config), "--prepared", str(given), "--out", str(tmp_path / "packed"))
        assert r.returncode == 2 and needle in only_error(r.stderr) and str(given) in r.stderr
        assert not (tmp_path / "packed").exists()

    r = run(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(tmp_path.glob("prepared.tmp-*"))  # swept
    first = read_manifest(out, "prepare")
    assert first["counts"]["rows_read"] == 150_000
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    r = run(*args)  # same inputs: a no-op that says so
    assert r.returncode == 0 and "up to date" in r.stderr and "nothing to do" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    r = run(*args, "--set", "data.seed=7")  # other inputs: refused, the output is kept
    assert r.returncode == 2
    assert "holds a different `prepare` output" in only_error(r.stderr) and "--overwrite" in r.stderr
    assert read_manifest(out)["fingerprint"] == first["fingerprint"]
    r = run(*args, "--set", "data.seed=7", "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_manifest(out)["fingerprint"] != first["fingerprint"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("prepared.")]


@pytest.mark.slow
def test_train_killed_while_writing_its_output_is_not_an_adapter(ws, tmp_path):
    """kill -9 after the last step, while the adapter folder is written: the next stage refuses the leftovers and
    the rerun finishes from the final checkpoint without training again."""
    out, ckpt = tmp_path / "adapter", tmp_path / "checkpoints"
    args = ws.train_args(out, ckpt, "--set", "train.max_steps=10", "--set", "train.merge=true")
    proc = start(tmp_path, *args)
    # merge=true makes the output slow to write (the base is reloaded and merged): kill during it.
    wait_for("the output to be written", lambda: any(tmp_path.glob("adapter.tmp-*/adapter_model.safetensors")), proc)
    proc.signal(signal.SIGKILL)
    proc.wait()
    if out.exists():
        pytest.skip("the stage finished before the kill landed (a very fast machine)")
    left = next(tmp_path.glob("adapter.tmp-*"))
    r = run(
        "evaluate",
        "-c",
        str(ws.config),
        "--adapter",
        str(left),
        "--packed",
        str(ws.packed),
        "--prepared",
        str(ws.prepared),
        "--out",
        str(tmp_path / "eval"),
    )
    assert r.returncode == 2 and "incomplete or not a kubetune output" in only_error(r.stderr)
    r = run(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "training_summary.json").read_text())
    assert s["resumed_from_step"] == 10 and s["steps_this_run"] == 0 and s["global_step"] == 10
    assert max_abs_diff(out, ckpt / "checkpoint-10") == 0.0  # the finished run's weights, no extra step
    assert (out / "merged" / "config.json").is_file() and not list(tmp_path.glob("adapter.tmp-*"))


def test_pack_failing_half_way_leaves_no_output(ws, tmp_path, monkeypatch):
    """A failure inside a stage (here: the disk filling up while the rows are saved) leaves nothing at `out`."""
    import datasets

    from kubetune import config
    from kubetune.pack import pack

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    real = datasets.Dataset.save_to_disk
    calls = []

    def full_disk(self, path, *a, **kw):
        calls.append(path)
        real(self, path, *a, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full_disk)
    cfg = config.load(ws.config)
    with pytest.raises(OSError, match="No space left"):
        pack(cfg, ws.prepared, tmp_path / "packed")
    assert calls and not (tmp_path / "packed").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("packed.")]


_HOLD = """
import sys, time
from kubetune.artifacts import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_prepare_on_the_same_output_is_refused_until_the_first_dies(ws, tmp_path):
    out = tmp_path / "prepared"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = run("prepare", "-c", str(ws.config), "--out", str(out))
        assert r.returncode == 2
        line = only_error(r.stderr)
        assert f"{out}: another kubetune run is writing here (pid {holder.pid} on " in line
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
        holder.wait()
    r = run("prepare", "-c", str(ws.config), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_manifest(out, "prepare")["counts"]["rows_read"] == 64
