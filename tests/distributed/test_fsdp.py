"""`kubetune train` with ``distributed.strategy: fsdp`` under a real torchrun (gloo, CPU): the frozen base is sharded
over the ranks (FSDP2, one unit per decoder layer) while the adapter stays whole on each; two ranks follow the
one-process optimisation, only rank 0 writes, checkpoints are DDP's (sealed, world-size independent), and a SIGTERM
to either rank stops both with one sealed checkpoint that resumes on one rank or two, and a rank killed with -9
fails the job (never a hang) with a checkpoint the restart resumes."""

from __future__ import annotations

import signal

import pytest
import torch
from reliability.procs import intact_steps, max_abs_diff, sealed_steps, summary

from .runs import MAX_STEPS, Dirs, follows, library_warnings, lose_a_rank, one_process, preempt, run, torchrun

pytestmark = pytest.mark.distributed

# Under fsdp each rank gathers a layer's whole weights before using them (a copy: exact) and runs the layer as one
# process would; the adapter, outside FSDP, has its gradients all-reduced by DDP as under ddp. So two ranks and one
# process do the same arithmetic: measured on this machine, the loss curves and adapters agree bit for bit (max abs
# difference 0.0, bf16 and fp32). The tolerance is DDP's (test_torchrun.TOLERANCE) for the same reasons: room for a
# gloo build or a CPU whose reduction order differs, while adapter weights are O(0.1) and one optimizer step moves
# them by O(1e-3), so a run that saw other rows, another batch or another loss scale fails it.
TOLERANCE = 1e-5


def test_one_process_with_fsdp_trains_as_plain_with_the_layer_rewrites_off(fsdp_reference):
    s = summary(fsdp_reference.out)
    settings = s["settings"]
    assert (s["world_size"], s["strategy"], s["backend"]) == (1, None, None) and "fsdp" not in s
    assert settings["strategy"] == {
        "value": None,
        "reason": "one process: distributed.strategy fsdp has no ranks to shard over; trains as plain",
    }
    # Off as on two ranks, so that a run resumed on another number of ranks does the same arithmetic.
    assert settings["lean_layers"]["value"] == settings["split_gemms"]["value"] == "off"
    assert settings["split_gemms"]["reason"].startswith("distributed.strategy fsdp: the frozen weights are shards")


def test_two_ranks_shard_the_base_and_follow_the_one_process_loss_curve_and_adapter(fsdp_reference, fsdp_two_nodes):
    n0, _, log0, _ = fsdp_two_nodes
    _, two = follows(fsdp_reference, n0, TOLERANCE)
    assert (two["world_size"], two["backend"], two["strategy"]) == (2, "gloo", "fsdp")
    reason = two["settings"]["strategy"]["reason"]
    assert two["settings"]["strategy"]["value"] == "fsdp"
    assert "one unit per decoder layer (LlamaDecoderLayer)" in reason and "1/2 of every weight" in reason
    # What was sharded: the 5 decoder layers and the root; every base weight of this model splits evenly in two.
    sharded = two["fsdp"]
    assert (sharded["units"], sharded["layer_classes"]) == (6, ["LlamaDecoderLayer"])
    assert sharded["base_bytes_this_rank"] * 2 == sharded["base_bytes"] > 0
    assert "FSDP: frozen base sharded over 2 ranks in 5 LlamaDecoderLayer units" in log0
    # The adapter is outside FSDP: DDP all-reduces its fp32 gradients and nothing else, once per optimizer step.
    assert two["allreduce_bytes_per_step"] == 4 * two["trainable_parameters"]
    # One micro-batch per rank and step: the forward gathers every unit's whole weights once, the backward the
    # decoder layers' again (resharded after the forward); the root stays gathered. Timed with the all-reduce.
    assert sharded["base_bytes"] < two["allgather_bytes_per_step"] < 2 * sharded["base_bytes"]
    assert two["collective_seconds_per_step"] > 0


def test_only_rank_0_writes_and_checkpoints_are_the_ddp_ones(fsdp_two_nodes, two_nodes):
    n0, n1, log0, log1 = fsdp_two_nodes
    assert (n0.out / "manifest.json").is_file() and (n0.out / "training_summary.json").is_file()
    assert intact_steps(n0.ckpt)[-1] == MAX_STEPS and sealed_steps(n0.ckpt) == intact_steps(n0.ckpt)
    written = sorted(p.relative_to(n1.ckpt.parent).as_posix() for p in n1.ckpt.parent.rglob("*") if p.is_file())
    assert written and all(w.startswith("checkpoints/checkpoint-") and w.endswith("/rng_state_1.pth") for w in written)
    assert not n1.out.exists() and not list(n1.out.parent.glob("adapter*"))
    assert "train: done ->" in log0 and "train: done" not in log1
    # The same files as a DDP checkpoint (no per-rank shards, no pytorch_model_fsdp.bin or .distcp folders) ...
    ddp0 = two_nodes[0]

    def files(ckpt):
        return sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*"))

    step = f"checkpoint-{MAX_STEPS}"
    assert files(n0.ckpt / step) == files(ddp0.ckpt / step)
    # ... holding whole tensors: the adapter's optimizer state as one process writes it.
    state = torch.load(n0.ckpt / step / "optimizer.pt", weights_only=True)
    moments = [t for s in state["state"].values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
    assert moments and all(type(t) is torch.Tensor for t in moments)
    assert sum(t.numel() for t in moments) == 2 * summary(n0.out)["trainable_parameters"]  # AdamW's two moments


@pytest.mark.parametrize(
    ("rank", "resume_on"), [(1, 1), (0, 2)], ids=["sigterm-rank-1-resume-on-1", "sigterm-rank-0-resume-on-2"]
)
def test_sigterm_under_fsdp_stops_both_and_the_retry_resumes_on_any_world_size(
    fws, fsdp_reference, tmp_path, rank, resume_on
):
    d = Dirs.under(tmp_path)
    step = preempt(fws, tmp_path, d, rank)  # exit 3 on every rank, one sealed checkpoint
    args = fws.train_args(d.out, d.ckpt)
    rerun = run(torchrun(*args, nproc=resume_on) if resume_on > 1 else one_process(*args))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from checkpoint-{step} (step {step})" in rerun.stderr
    assert ("RNG states not restored" in rerun.stderr) == (resume_on != 2)
    assert not library_warnings(rerun.stderr)
    s = summary(d.out)
    assert (s["global_step"], s["world_size"], step + s["steps_this_run"]) == (MAX_STEPS, resume_on, MAX_STEPS)
    assert s["strategy"] == ("fsdp" if resume_on > 1 else None)
    assert s["tokens_seen"] == summary(fsdp_reference.out)["tokens_seen"]
    assert [st for st, _ in s["loss_curve"]] == list(range(1, MAX_STEPS + 1))
    assert max_abs_diff(d.out, fsdp_reference.out) <= TOLERANCE


def test_a_rank_killed_under_fsdp_fails_the_job_within_the_timeout_and_the_restart_resumes(
    fws, fsdp_reference, tmp_path
):
    """Under fsdp the survivor is waiting in an all-gather of the next layer's weights as often as in DDP's
    all-reduce: either collective fails at once when the peer's connection closes."""
    d = Dirs.under(tmp_path)
    newest = lose_a_rank(fws, tmp_path, d, signal.SIGKILL)
    rerun = run(torchrun(*fws.train_args(d.out, d.ckpt), nproc=2))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    s = summary(d.out)
    assert (s["resumed_from_step"], s["global_step"], s["strategy"]) == (newest, MAX_STEPS, "fsdp")
    assert max_abs_diff(d.out, fsdp_reference.out) <= TOLERANCE
