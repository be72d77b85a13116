"""One writer: a second `kubetune train` on the same output (or the same checkpoint folder) is refused with a clear
message and exit 2; once the first is killed with -9, nothing is left blocking a new run."""

from __future__ import annotations

import signal

import pytest

from .procs import PREEMPTED, intact_steps, kubetune_lines, run, sealed_steps, start, wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

LONG = "train.max_steps=5000"  # the first run must outlive the two refused ones; it is killed long before the end


def test_second_train_is_refused_and_a_kill_9_frees_the_output(ws, tmp_path):
    out, ckpt = tmp_path / "adapter", tmp_path / "checkpoints"
    args = ws.train_args(out, ckpt, "--set", LONG)
    first = start(tmp_path, *args, name="first")
    try:
        wait_for("the first run to train", lambda: bool(sealed_steps(ckpt)), first)

        second = run(*args)
        assert second.returncode == 2
        lines = kubetune_lines(second.stderr)
        assert len(lines) == 1 and "Traceback" not in second.stderr
        assert lines[0].startswith(f"kubetune: error: {out}: another kubetune run is writing here (pid {first.pid} on ")

        # Another adapter folder, but the same checkpoint folder: refused too (they would overwrite each other).
        other = tmp_path / "other-adapter"
        third = run(*ws.train_args(other, ckpt, "--set", LONG))
        assert third.returncode == 2
        lines = kubetune_lines(third.stderr)
        assert len(lines) == 1
        assert lines[0].startswith(
            f"kubetune: error: config key `train.checkpoint_dir`: {ckpt} is in use by another kubetune run "
            f"(pid {first.pid} on "
        )
        assert not other.exists()
        assert first.popen.poll() is None  # still training: the refused runs did not disturb it
    finally:
        first.signal(signal.SIGKILL)
        first.wait()

    # Nothing blocks a new run: it takes both locks, resumes from the newest intact checkpoint and trains on
    # (stopped here with SIGTERM to keep the test short).
    newest = intact_steps(ckpt)[-1]
    again = start(tmp_path, *args, name="again")
    wait_for("the new run to resume", lambda: f"resuming from checkpoint-{newest} " in again.stderr(), again)
    wait_for("a checkpoint of the new run", lambda: sealed_steps(ckpt)[-1] > newest, again)
    again.signal(signal.SIGTERM)
    assert again.wait() == 3
    m = PREEMPTED.match(kubetune_lines(again.stderr())[-1])
    assert m and int(m[1]) > newest
