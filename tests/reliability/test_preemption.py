"""Preemption: SIGTERM during `kubetune train` saves a checkpoint at the end of the step and exits 3; the same
command resumes and ends with the adapter an uninterrupted run makes. Real processes, real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from .procs import (
    MAX_STEPS,
    PREEMPTED,
    SAVE_STEPS,
    intact_steps,
    kubetune_lines,
    max_abs_diff,
    run,
    sealed_steps,
    start,
    summary,
    wait_for,
)

pytestmark = pytest.mark.reliability

# Interrupted and uninterrupted runs do the same float operations in the same order (one thread, same data order,
# restored RNG, optimizer and scheduler state), so they agree exactly; the tolerance only absorbs a platform that
# would not be bit-reproducible. Adapter weights are O(0.1) here, and a one-step difference is O(1e-3).
TOLERANCE = 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout-0.1"])
def test_sigterm_checkpoints_exits_3_and_the_rerun_matches_an_uninterrupted_run(ws, reference, tmp_path, dropout):
    out, ckpt = tmp_path / "adapter", tmp_path / "checkpoints"
    args = ws.train_args(out, ckpt, "--set", f"lora.dropout={dropout}")
    proc = start(tmp_path, *args)
    wait_for("the first periodic checkpoint", lambda: bool(sealed_steps(ckpt)), proc)
    proc.signal(signal.SIGTERM)
    rc = proc.wait()
    err = proc.stderr()
    assert rc == 3, err[-3000:]
    assert "Traceback" not in err
    lines = kubetune_lines(err)
    assert len(lines) == 1, lines
    m = PREEMPTED.match(lines[0])
    assert m, lines[0]
    step = int(m[1])
    assert SAVE_STEPS <= step < MAX_STEPS
    assert m[2] == str(ckpt / f"checkpoint-{step}")
    assert intact_steps(ckpt)[-1] == step  # the checkpoint of the step it stopped at, complete and intact
    assert not out.exists() and not list(tmp_path.glob("adapter.tmp-*"))  # no adapter until the run is done

    rerun = run(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from checkpoint-{step} (step {step})" in rerun.stderr
    s = summary(out)
    assert s["resumed_from_step"] == step and s["resumed_from"] == str(ckpt / f"checkpoint-{step}")
    assert s["global_step"] == s["max_steps"] == MAX_STEPS
    assert step + s["steps_this_run"] == MAX_STEPS  # optimizer steps over the two runs
    ref = summary(reference(dropout))
    assert ref["resumed_from_step"] is None  # a fresh run records null, not 0
    assert s["tokens_seen"] == ref["tokens_seen"]  # each trained token counted exactly once
    assert [st for st, _ in s["loss_curve"]] == [st for st, _ in ref["loss_curve"]]
    assert max_abs_diff(out, reference(dropout)) <= TOLERANCE


@pytest.mark.slow
def test_sigterm_before_training_starts_exits_3_and_saves_nothing(ws, tmp_path):
    """A signal while the model loads: nothing was trained, so the resume point stays as it is."""
    out, ckpt = tmp_path / "adapter", tmp_path / "checkpoints"
    proc = start(tmp_path, *ws.train_args(out, ckpt))
    # The handler is installed when the train stage starts; this log line comes after that, before training.
    wait_for("the stage to start", lambda: "auto setting precision" in proc.stderr(), proc)
    proc.signal(signal.SIGTERM)
    rc = proc.wait()
    err = proc.stderr()
    assert rc == 3, err[-3000:]
    assert kubetune_lines(err) == ["kubetune: preempted at step 0; run the same command again to resume"]
    assert sealed_steps(ckpt) == [] and not out.exists()


# A stand-in for a training step that never finishes: the handler of the train stage, then a long sleep.
_STUCK = """
import sys, time
from kubetune.preemption import Preemption
with Preemption(float(sys.argv[1])):
    print("ready", flush=True)
    time.sleep(float(sys.argv[2]))
    print("left the stage", flush=True)
time.sleep(float(sys.argv[3]))
print("survived", flush=True)
"""


def _stuck(grace: float, step_s: float, after_s: float = 0.0) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", _STUCK, str(grace), str(step_s), str(after_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "ready"
    return p


def test_watchdog_exits_3_when_the_step_outlasts_the_grace():
    p = _stuck(grace=1.0, step_s=60)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 3
    assert time.monotonic() - t0 < 10
    assert "did not finish within train.preempt_grace_s" in err and "newest periodic checkpoint" in err
    assert "left the stage" not in out


def test_second_signal_exits_at_once():
    p = _stuck(grace=600.0, step_s=60)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=30)
    assert p.returncode == 3 and time.monotonic() - t0 < 5


def test_watchdog_stands_down_when_the_stage_ends():
    """A stage that finished (here: the step ends well inside the grace) is never killed afterwards."""
    p = _stuck(grace=5.0, step_s=1.5, after_s=4.0)  # the watchdog would fire 3 s after the signal
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "left the stage" in out and "survived" in out
