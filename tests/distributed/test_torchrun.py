"""`kubetune train` under a real torchrun (gloo, CPU): two ranks follow the one-process optimisation, only rank 0
writes, a SIGTERM to either rank stops both at one step with one sealed checkpoint and the retry resumes on the same
or another world size, a rank killed with -9 fails the job (never a hang) and the restart resumes."""

from __future__ import annotations

import signal

import pytest
from reliability.procs import adapter_tensors, intact_steps, max_abs_diff, summary

from kubetune.checkpoints import PREEMPTED_FILE

from .runs import (
    MAX_STEPS,
    Dirs,
    follows,
    library_warnings,
    lose_a_rank,
    one_process,
    preempt,
    run,
    torchrun,
)

pytestmark = pytest.mark.distributed

# One process and two ranks train on the same rows per optimizer step, in the same order (split_batches), and their
# gradients differ only by DDP's sum-then-divide over two ranks against accumulating two passes: multiplications by
# powers of two, exact in floating point, so on this machine the adapters agree bit for bit. The tolerance leaves
# room for a gloo build or a CPU whose reduction order differs; adapter weights are O(0.1) here and one optimizer
# step moves them by O(1e-3), so 1e-5 still catches a run that saw other rows, another batch or another loss scale.
TOLERANCE = 1e-5


def _curve(d: Dirs) -> list[list[float]]:
    return summary(d.out)["loss_curve"]


def test_two_ranks_follow_the_one_process_loss_curve_and_adapter(reference, two_nodes):
    n0, _, _, _ = two_nodes
    ref, two = follows(reference, n0, TOLERANCE)
    assert (two["world_size"], two["backend"], ref["world_size"], ref["backend"]) == (2, "gloo", 1, None)
    rates = two["tokens_per_second_per_rank"]
    assert len(rates) == 2 and all(r > 0 for r in rates)
    assert two["train_tokens_per_second"] > 0
    # DDP all-reduces the adapter's fp32 gradients and nothing else, once per optimizer step.
    assert two["allreduce_bytes_per_step"] == 4 * two["trainable_parameters"] and two["allgather_bytes_per_step"] == 0
    assert two["collective_seconds_per_step"] > 0
    assert (ref["allreduce_bytes_per_step"], ref["collective_seconds_per_step"]) == (0, 0.0)
    assert two["settings"]["backend"]["value"] == "gloo"
    assert "2 ranks on CPU" in two["settings"]["backend"]["reason"]


def test_only_rank_0_writes(two_nodes):
    n0, n1, log0, log1 = two_nodes
    assert (n0.out / "manifest.json").is_file() and (n0.out / "training_summary.json").is_file()
    assert intact_steps(n0.ckpt)[-1] == MAX_STEPS
    # Rank 1 was handed folders of its own: all it wrote is its RNG state inside the checkpoints the Trainer saves
    # (rank 0 seals each only after every rank has written its part).
    written = sorted(p.relative_to(n1.ckpt.parent).as_posix() for p in n1.ckpt.parent.rglob("*") if p.is_file())
    assert written and all(w.startswith("checkpoints/checkpoint-") and w.endswith("/rng_state_1.pth") for w in written)
    assert not n1.out.exists() and not list(n1.out.parent.glob("adapter*"))
    assert "train: done ->" in log0 and "train: done" not in log1
    assert not library_warnings(log0) and not library_warnings(log1)
    assert not list(n0.ckpt.glob("checkpoint-*/rng_state_1.pth"))


@pytest.mark.parametrize(
    ("rank", "resume_on"), [(1, 1), (0, 2)], ids=["sigterm-rank-1-resume-on-1", "sigterm-rank-0-resume-on-2"]
)
def test_sigterm_to_either_rank_stops_both_and_the_retry_resumes_on_any_world_size(
    dws, reference, tmp_path, rank, resume_on
):
    d = Dirs.under(tmp_path)
    step = preempt(dws, tmp_path, d, rank)
    args = dws.train_args(d.out, d.ckpt)
    rerun = run(torchrun(*args, nproc=resume_on) if resume_on > 1 else one_process(*args))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stderr
    assert f"resuming from checkpoint-{step} (step {step})" in log
    # A checkpoint of 2 ranks resumed on 1 restores no per-rank RNG state, and says so once, without a warning.
    assert ("RNG states not restored" in log) == (resume_on != 2)
    assert "Didn't find an RNG file" not in log
    assert not library_warnings(log)
    s = summary(d.out)
    assert s["global_step"] == MAX_STEPS and step + s["steps_this_run"] == MAX_STEPS and s["world_size"] == resume_on
    assert s["tokens_seen"] == summary(reference.out)["tokens_seen"]
    assert [st for st, _ in s["loss_curve"]] == list(range(1, MAX_STEPS + 1))
    assert max_abs_diff(d.out, reference.out) <= TOLERANCE
    assert not (d.ckpt / PREEMPTED_FILE).exists()  # the retry took the folder: the record is gone


def test_one_process_preempted_resumes_on_two_ranks(dws, reference, tmp_path):
    d = Dirs.under(tmp_path)
    step = preempt(dws, tmp_path, d, 0, nproc=1)
    rerun = run(torchrun(*dws.train_args(d.out, d.ckpt), nproc=2))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"checkpoint-{step} was written by 1 rank(s), this run has 2" in rerun.stderr
    s = summary(d.out)
    assert (s["global_step"], s["world_size"], step + s["steps_this_run"]) == (MAX_STEPS, 2, MAX_STEPS)
    assert max_abs_diff(d.out, reference.out) <= TOLERANCE


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["kill-9", "stopped"])
def test_a_lost_rank_fails_the_job_within_the_timeout_and_the_restart_resumes(dws, reference, tmp_path, how):
    """kill -9: the peer's connection closes at once; SIGSTOP (a hung rank, a node gone silent): the survivor gives
    up after distributed.timeout_s. Either way rank 0 says so in one line and seals nothing more."""
    d = Dirs.under(tmp_path)
    newest = lose_a_rank(dws, tmp_path, d, how)

    rerun = run(torchrun(*dws.train_args(d.out, d.ckpt), nproc=2))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    s = summary(d.out)
    assert s["resumed_from_step"] == newest and s["global_step"] == MAX_STEPS
    assert max_abs_diff(d.out, reference.out) <= TOLERANCE


def test_qlora_under_ddp_reduces_only_the_adapter_and_matches_one_process(dws, tmp_path):
    """The 4-bit base (bitsandbytes' CPU path) stays out of DDP: each rank holds its own quantised copy."""
    qlora = ("--set", "method=qlora", "--set", "train.max_steps=8")
    one, two = Dirs.under(tmp_path / "one"), Dirs.under(tmp_path / "two")
    r1 = run(one_process(*dws.train_args(one.out, one.ckpt, *qlora)))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run(torchrun(*dws.train_args(two.out, two.ckpt, *qlora), nproc=2))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "4-bit linear modules" in r2.stderr
    assert max_abs_diff(one.out, two.out) <= TOLERANCE
    s = summary(two.out)
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter_tensors(two.out).values())
    assert s["allreduce_bytes_per_step"] == adapter_bytes and s["world_size"] == 2
