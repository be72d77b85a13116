"""Stage outputs: fingerprints, the atomic write with its manifest, no-op re-runs, refusals, the one-writer lock."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune import artifacts
from kubetune.artifacts import (
    MANIFEST,
    dir_digest,
    fingerprint,
    lock_holder,
    output_lock,
    read_manifest,
    stage_output,
    write_json_atomic,
)
from kubetune.errors import UserError


def write_stage(out: Path, fp: str, files: dict[str, str], *, stage: str = "prepare", overwrite: bool = False):
    with stage_output(out, stage, fp, inputs={"data": "x"}, config={"k": 1}, overwrite=overwrite) as w:
        if w.up_to_date:
            return w
        for name, text in files.items():
            (w.tmp / name).write_text(text)
        w.counts["rows"] = len(files)
    return w


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


def test_fingerprint_is_canonical():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})  # key order does not matter
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint([1, 2]) != fingerprint([2, 1])  # list order does
    assert fingerprint("x", None) != fingerprint("x")
    assert len(fingerprint()) == 64


def test_dir_digest_covers_names_and_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.safetensors").write_bytes(b"123")
    (tmp_path / "notes.txt").write_text("ignored by the pattern")
    d1 = dir_digest(tmp_path, ("*.safetensors",))
    (tmp_path / "notes.txt").write_text("changed")
    assert dir_digest(tmp_path, ("*.safetensors",)) == d1
    (tmp_path / "a" / "w.safetensors").write_bytes(b"124")
    assert dir_digest(tmp_path, ("*.safetensors",)) != d1
    (tmp_path / "a" / "w.safetensors").write_bytes(b"123")
    (tmp_path / "a" / "w.safetensors").rename(tmp_path / "a" / "v.safetensors")
    assert dir_digest(tmp_path, ("*.safetensors",)) != d1


def test_stage_output_writes_atomically_with_manifest_last(tmp_path):
    out = tmp_path / "prepared"
    seen_during: list[bool] = []
    with stage_output(out, "prepare", "f1", inputs={"data": "d"}, config={"k": 1}) as w:
        (w.tmp / "train.jsonl").write_text("{}\n")
        seen_during.append(out.exists())
        assert w.tmp.parent == out.parent and w.tmp.name.startswith("prepared.tmp-")
        assert not (w.tmp / MANIFEST).exists()
        w.counts["rows"] = 1
        w.extra["note"] = "kept"
    assert seen_during == [False]  # nothing at `out` until the very end
    m = read_manifest(out, "prepare")
    assert m["stage"] == "prepare" and m["artifact"] == "prepared_dataset" and m["complete"] is True
    assert m["fingerprint"] == "f1" and m["counts"] == {"rows": 1} and m["note"] == "kept"
    assert m["inputs"] == {"data": "d"} and m["config"] == {"k": 1} and m["kubetune_version"]
    assert (out / "train.jsonl").read_text() == "{}\n"
    assert leftovers(out) == []  # the temp folder was renamed, the lock file is hidden (.prepared.lock)


def test_same_fingerprint_is_a_noop_that_says_so(tmp_path, caplog):
    out = tmp_path / "prepared"
    write_stage(out, "f1", {"a.txt": "one"})
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    inode = out.stat().st_ino
    with caplog.at_level(logging.INFO, logger="kubetune.artifacts"):
        w = write_stage(out, "f1", {"a.txt": "two"})
    assert w.up_to_date and w.counts == {"rows": 1}
    assert "up to date" in caplog.text and "nothing to do" in caplog.text
    assert (out / "a.txt").read_text() == "one" and out.stat().st_ino == inode
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_different_fingerprint_refuses_unless_overwrite(tmp_path):
    out = tmp_path / "prepared"
    write_stage(out, "f1", {"a.txt": "one"})
    with pytest.raises(UserError, match=r"holds a different `prepare` output .* pass --overwrite"):
        write_stage(out, "f2", {"a.txt": "two"})
    assert (out / "a.txt").read_text() == "one"
    write_stage(out, "f2", {"b.txt": "two"}, overwrite=True)
    assert read_manifest(out)["fingerprint"] == "f2"
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", MANIFEST]  # replaced whole, nothing mixed in
    assert leftovers(out) == []
    # Another stage's output is "different" too.
    with pytest.raises(UserError, match=r"holds a different `prepare` output"):
        write_stage(out, "f2", {}, stage="pack")


def test_failure_inside_the_stage_leaves_nothing(tmp_path):
    out = tmp_path / "packed"

    class Boom(Exception):
        pass

    with pytest.raises(Boom), stage_output(out, "pack", "f1", inputs={}, config={}) as w:
        (w.tmp / "half.arrow").write_bytes(b"x" * 100)
        raise Boom
    assert not out.exists() and leftovers(out) == []
    # And an existing output survives a failed overwrite untouched.
    write_stage(out, "f1", {"a.txt": "one"}, stage="pack")
    with pytest.raises(Boom), stage_output(out, "pack", "f2", inputs={}, config={}, overwrite=True) as w:
        raise Boom
    assert read_manifest(out, "pack")["fingerprint"] == "f1" and leftovers(out) == []


def test_a_failed_final_rename_puts_the_previous_output_back(tmp_path, monkeypatch):
    out = tmp_path / "packed"
    write_stage(out, "f1", {"a.txt": "one"}, stage="pack")
    real = os.replace

    def flaky(src, dst):
        if Path(src).name.startswith("packed.tmp-"):
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", flaky)
    with pytest.raises(OSError, match="Input/output error"):
        write_stage(out, "f2", {"a.txt": "two"}, stage="pack", overwrite=True)
    monkeypatch.undo()
    assert read_manifest(out, "pack")["fingerprint"] == "f1" and (out / "a.txt").read_text() == "one"
    assert leftovers(out) == []


def test_leftovers_of_a_killed_writer_are_swept_and_never_accepted(tmp_path):
    out = tmp_path / "prepared"
    tmp = tmp_path / "prepared.tmp-999-abcdef"  # a writer killed before its rename
    tmp.mkdir()
    (tmp / "train.jsonl").write_text("half")
    old = tmp_path / "prepared.old-abcdef"  # a writer killed between the two renames of --overwrite
    old.mkdir()
    with pytest.raises(UserError, match="incomplete or not a kubetune output"):
        read_manifest(tmp, "prepare")
    write_stage(out, "f1", {"a.txt": "one"})
    assert not tmp.exists() and not old.exists()


def test_a_folder_that_is_not_a_complete_output(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "train.jsonl").write_text("user data")
    with pytest.raises(UserError, match=r"exists and is not a complete kubetune output; remove it, pass --overwrite"):
        write_stage(out, "f1", {})
    assert (out / "train.jsonl").read_text() == "user data"
    # An empty folder is fine to write into.
    empty = tmp_path / "empty"
    empty.mkdir()
    write_stage(empty, "f1", {"a.txt": "one"})
    assert read_manifest(empty)["fingerprint"] == "f1"


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        (lambda d: None, "not found; expected a prepared_dataset directory (run `kubetune prepare` first)"),
        (lambda d: d.mkdir(), "incomplete or not a kubetune output (no complete manifest.json)"),
        (lambda d: (d.mkdir(), (d / MANIFEST).write_text('{"stage": "prep')), "incomplete"),
        (lambda d: (d.mkdir(), (d / MANIFEST).write_text('{"stage": "prepare", "complete": false}')), "incomplete"),
        (lambda d: (d.mkdir(), (d / MANIFEST).write_text("[1, 2]")), "incomplete"),
        (
            lambda d: (d.mkdir(), (d / MANIFEST).write_text('{"stage": "pack", "complete": true}')),
            "is a `pack` output, expected a prepared_dataset from `kubetune prepare`",
        ),
    ],
    ids=["missing", "no-manifest", "cut-off-manifest", "not-complete", "not-a-mapping", "other-stage"],
)
def test_read_manifest_refuses(tmp_path, setup, needle):
    d = tmp_path / "prepared"
    setup(d)
    with pytest.raises(UserError) as err:
        read_manifest(d, "prepare")
    assert needle in str(err.value) and str(d) in str(err.value) and "\n" not in str(err.value)


def test_write_json_atomic(tmp_path):
    p = tmp_path / "state.json"
    write_json_atomic(p, {"a": 1})
    write_json_atomic(p, {"a": 2, "text": "é"})
    assert json.loads(p.read_text(encoding="utf-8")) == {"a": 2, "text": "é"}
    assert [x.name for x in tmp_path.iterdir()] == ["state.json"]


# ----------------------------------------------------------------------------------------------------
# One writer


def test_second_writer_is_refused_and_names_the_first(tmp_path):
    out = tmp_path / "adapter"
    with output_lock(out):
        with pytest.raises(UserError) as err, output_lock(out):
            pass
        assert f"pid {os.getpid()}" in str(err.value) and "another kubetune run is writing here" in str(err.value)
        assert lock_holder(out).startswith(f"pid {os.getpid()} on ")
        with pytest.raises(UserError, match="another kubetune run is writing here"):
            write_stage(out, "f1", {})
    with output_lock(out):  # released on exit
        pass
    write_stage(out, "f1", {"a.txt": "one"})
    assert read_manifest(out)["fingerprint"] == "f1"


_HOLD = """
import sys, time
from kubetune.artifacts import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.reliability
def test_lock_held_by_another_process_is_released_by_kill_9(tmp_path):
    """The lock is an flock: a holder that dies (even by SIGKILL) holds nothing, no stale lock file to clean."""
    out = tmp_path / "prepared"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"another kubetune run is writing here \(pid {holder.pid} on "):
            write_stage(out, "f1", {})
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    t0 = time.monotonic()
    write_stage(out, "f1", {"a.txt": "one"})
    assert time.monotonic() - t0 < 5 and read_manifest(out)["fingerprint"] == "f1"
    assert not artifacts._lock_path(out).exists()  # the writer that took the lock over removed it when done


def test_a_failed_stage_leaves_no_lock_file_and_no_folder_it_created(tmp_path):
    out = tmp_path / "new" / "deeper" / "prepared"
    with pytest.raises(ValueError, match="bad input"), stage_output(out, "prepare", "f1", inputs={}, config={}):
        raise ValueError("bad input")
    assert not (tmp_path / "new").exists()  # the folders made to hold the lock are gone with it
    out = tmp_path / "prepared"
    with pytest.raises(ValueError), stage_output(out, "prepare", "f1", inputs={}, config={}):
        raise ValueError("bad input")
    assert list(tmp_path.iterdir()) == []  # no `.prepared.lock`, no temporary folder


def test_a_finished_stage_leaves_no_lock_file(tmp_path):
    out = tmp_path / "prepared"
    write_stage(out, "f1", {"a.txt": "one"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


_COUNT = """
import sys, time
from pathlib import Path
from kubetune.artifacts import output_lock
from kubetune.errors import UserError
out, counter, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
done = 0
while done < rounds:
    try:
        with output_lock(out):
            n = int(counter.read_text())
            time.sleep(0.0005)  # widen the window in which a second holder would lose an update
            counter.write_text(str(n + 1))
            done += 1
    except UserError:
        time.sleep(0.0002)
"""


def test_removing_the_lock_file_keeps_writers_exclusive(tmp_path):
    """A writer that opened the lock file just before its holder removed it must not lock the removed file and
    run beside the next holder: three processes increment a counter under the lock; no update may be lost."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    procs = [
        subprocess.Popen([sys.executable, "-c", _COUNT, str(tmp_path / "out"), str(counter), "400"]) for _ in range(3)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    assert counter.read_text() == "1200"
    assert not (tmp_path / ".out.lock").exists()
