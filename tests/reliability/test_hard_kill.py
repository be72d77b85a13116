"""Hard kills: `kill -9` at a random point of `kubetune train`; checkpoints cut off while being written or damaged
afterwards. The rerun resumes from the newest complete, intact checkpoint and never loads a broken one."""

from __future__ import annotations

import os
import random
import shutil
import signal
import time

import pytest

from .procs import (
    MAX_STEPS,
    intact_steps,
    max_abs_diff,
    run,
    sealed_steps,
    start,
    summary,
    wait_for,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

TOLERANCE = 1e-6  # see test_preemption.py


def test_kill_9_at_a_random_point_resumes_from_the_newest_complete_checkpoint(ws, reference, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    delay = random.Random(seed).uniform(0.0, 1.0)
    out, ckpt = tmp_path / "adapter", tmp_path / "checkpoints"
    args = ws.train_args(out, ckpt, "--set", "lora.dropout=0.1")
    proc = start(tmp_path, *args)
    wait_for("the first periodic checkpoint", lambda: bool(sealed_steps(ckpt)), proc)
    time.sleep(delay)
    assert proc.popen.poll() is None, f"training ended before the kill (seed {seed}):\n{proc.stderr()[-2000:]}"
    proc.signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    newest = intact_steps(ckpt)[-1]
    assert newest < MAX_STEPS, f"seed {seed}"

    rerun = run(*args)  # not blocked: the dead process's locks are gone with it
    assert rerun.returncode == 0, f"seed {seed}:\n{rerun.stderr[-3000:]}"
    s = summary(out)
    assert s["resumed_from_step"] == newest, f"seed {seed}"
    assert s["global_step"] == MAX_STEPS and newest + s["steps_this_run"] == MAX_STEPS
    assert s["tokens_seen"] == summary(reference(0.1))["tokens_seen"]
    assert max_abs_diff(out, reference(0.1)) <= TOLERANCE, f"seed {seed}"
    assert not list(tmp_path.glob("adapter.tmp-*"))  # the killed writer's temp folder was swept


def test_cut_off_and_damaged_checkpoints_are_skipped_never_loaded(ws, reference, tmp_path):
    ref = reference(0.0)
    ckpt = tmp_path / "checkpoints"
    # The reference run's checkpoints (same run fingerprint: the checkpoint folder is not part of it).
    shutil.copytree(ref.parent / "checkpoints", ckpt)
    steps = sealed_steps(ckpt)
    assert len(steps) == 3 and steps[-1] == MAX_STEPS
    newest, middle, _oldest = (ckpt / f"checkpoint-{s}" for s in reversed(steps))
    (newest / "kubetune-complete.json").unlink()  # cut off while being written: no marker
    with open(middle / "optimizer.pt", "r+b") as fh:  # damaged after sealing: truncated
        fh.truncate(fh.seek(0, os.SEEK_END) // 2)
    half = ckpt / f"checkpoint-{MAX_STEPS + 5}"  # a folder the Trainer had only begun
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"\0" * 10)

    out = tmp_path / "adapter"
    r = run(*ws.train_args(out, ckpt))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint {newest} is incomplete" in r.stderr and f"checkpoint {half} is incomplete" in r.stderr
    assert f"checkpoint {middle} is damaged (optimizer.pt has" in r.stderr
    s = summary(out)
    assert s["resumed_from_step"] == steps[0] and s["global_step"] == MAX_STEPS
    assert max_abs_diff(out, ref) <= TOLERANCE
    # The broken ones were removed; the rerun wrote its own, sealed and intact.
    assert not half.exists() and intact_steps(ckpt) == steps
