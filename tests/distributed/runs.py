"""Helpers for the distributed tests: `kubetune train` under a real torchrun (gloo on CPU), one process as the
reference, the workers' pids by rank, and what torchrun reports about each rank.

Every run uses one thread per rank (``train.threads: 1``) so that one process and N ranks do the same arithmetic.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from reliability.procs import (
    PREEMPTED,
    Proc,
    env,
    intact_steps,
    kubetune_cmd,
    kubetune_lines,
    max_abs_diff,
    sealed_steps,
    summary,
    wait_for,
)

from kubetune.checkpoints import PREEMPTED_FILE

MAX_STEPS = 40  # a few seconds: long enough that a signal sent after the first checkpoint lands mid-training
SAVE_STEPS = 5
TIMEOUT_S = 20  # distributed.timeout_s of these runs: no rank may wait longer for a dead peer
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# torchrun's failure report: one block per rank that exited non-zero.
REPORT = re.compile(r"rank\s+: (\d+) \(local_rank: \d+\)\n\s+exitcode\s+: (-?\d+)")
# A library's warning on any rank, through kubetune's log format or transformers' own handler (a library logger
# that does not propagate to the root logger prints "[transformers] ...").
LIBRARY_WARNING = re.compile(r"^(?:\S+ W (?:transformers|peft|trl|accelerate)\b|\[transformers\]).*$", re.M)


def library_warnings(log: str) -> list[str]:
    """The library warnings in a run's log: without ``--verbose`` every rank shows only kubetune's own lines."""
    return LIBRARY_WARNING.findall(log)


def follows(reference: Dirs, ranks: Dirs, tolerance: float) -> tuple[dict, dict]:
    """Check that the run in ``ranks`` followed the one-process ``reference``: every step, the same loss curve and
    adapter within ``tolerance``, every row once; returns both summaries."""
    ref, two = summary(reference.out), summary(ranks.out)
    assert [s for s, _ in two["loss_curve"]] == list(range(1, MAX_STEPS + 1))
    assert max(abs(a[1] - b[1]) for a, b in zip(ref["loss_curve"], two["loss_curve"], strict=True)) <= tolerance
    assert max_abs_diff(reference.out, ranks.out) <= tolerance
    assert two["tokens_seen"] == ref["tokens_seen"]  # every row once, over both ranks
    return ref, two


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, nnodes: int = 1, node_rank: int = 0, port: int | None = None) -> list[str]:
    """``torchrun ... -m kubetune.cli ARGS`` on this machine (static rendezvous on 127.0.0.1)."""
    return [
        *TORCHRUN,
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        f"--node-rank={node_rank}",
        "--master-addr=127.0.0.1",
        f"--master-port={port or free_port()}",
        "-m",
        "kubetune.cli",
        *args,
    ]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def start(tmp: Path, cmd: list[str], name: str = "torchrun") -> Proc:
    path = tmp / f"{name}-{time.monotonic_ns()}.log"
    fh = open(path, "w")  # noqa: SIM115 (the child owns it)
    p = subprocess.Popen(cmd, env=env(), stdout=fh, stderr=subprocess.STDOUT, text=True)
    fh.close()
    return Proc(p, path)


def one_process(*args: str) -> list[str]:
    return kubetune_cmd(*args)


def rank_pids(proc: Proc, n: int) -> dict[int, int]:
    """The torchrun agent's workers, by global rank (read from each worker's RANK)."""
    import psutil

    found: dict[int, int] = {}

    def ready() -> bool:
        for child in psutil.Process(proc.pid).children():
            try:
                found[int(child.environ()["RANK"])] = child.pid
            except (psutil.Error, KeyError, ValueError):
                continue
        return len(found) == n

    wait_for(f"{n} workers", ready, proc)
    return found


def rank_exit_codes(log: str) -> dict[int, int]:
    return {int(r): int(c) for r, c in REPORT.findall(log)}


@dataclass
class Dirs:
    out: Path
    ckpt: Path

    @classmethod
    def under(cls, root: Path) -> Dirs:
        return cls(root / "adapter", root / "checkpoints")


def preempt(dws, tmp, d: Dirs, rank: int, nproc: int = 2):
    """Start a run of workspace ``dws`` on ``nproc`` ranks, SIGTERM rank ``rank`` once the first checkpoint is sealed,
    check that every rank stopped at one step with that step's checkpoint sealed; returns the step."""
    args = dws.train_args(d.out, d.ckpt)
    proc = start(tmp, torchrun(*args, nproc=nproc) if nproc > 1 else one_process(*args))
    pids = rank_pids(proc, nproc) if nproc > 1 else {0: proc.pid}
    wait_for("the first periodic checkpoint", lambda: bool(sealed_steps(d.ckpt)), proc)
    os.kill(pids[rank], signal.SIGTERM)
    rc = proc.wait()
    log = proc.stderr()
    assert rc != 0, f"the run reached max_steps before the SIGTERM sent after step {SAVE_STEPS} landed:\n{log[-3000:]}"
    steps = {int(m[1]) for line in kubetune_lines(log) if (m := PREEMPTED.match(line))}
    assert len(steps) == 1, log[-3000:]  # every rank that says so stopped at the same step
    step = steps.pop()
    assert SAVE_STEPS <= step < MAX_STEPS
    assert intact_steps(d.ckpt)[-1] == step and not d.out.exists()
    record = json.loads((d.ckpt / PREEMPTED_FILE).read_text())
    assert (record["step"], record["checkpoint"], record["world_size"]) == (
        step,
        str(d.ckpt / f"checkpoint-{step}"),
        nproc,
    )
    if nproc > 1:
        assert rc == 1  # torchrun's own code for "a worker exited non-zero": the record tells it was a preemption
        assert rank_exit_codes(log) == {0: 3, 1: 3}, log[-3000:]
    else:
        assert rc == 3
    return step


def lose_a_rank(ws, tmp, d: Dirs, how: int) -> int:
    """Start a 2-rank run of workspace ``ws``, send rank 1 ``how`` (SIGKILL: its connections close at once; SIGSTOP:
    a hung rank, a node gone silent) once the first checkpoint is sealed, and check that rank 0 gave up within
    ``distributed.timeout_s`` in one line, torchrun failed the job naming the lost rank, and nothing was sealed after
    the loss. Returns the newest intact checkpoint's step, where the restart resumes."""
    proc = start(tmp, torchrun(*ws.train_args(d.out, d.ckpt), nproc=2))
    pids = rank_pids(proc, 2)
    wait_for("the first periodic checkpoint", lambda: bool(sealed_steps(d.ckpt)), proc)
    sealed_before = set(intact_steps(d.ckpt))
    t0 = time.monotonic()
    os.kill(pids[1], how)
    lost = "kubetune: rank 0 of 2 lost contact with another rank ("
    wait_for("rank 0 to give up", lambda: lost in proc.stderr(), proc, timeout=TIMEOUT_S + 30)
    assert time.monotonic() - t0 <= TIMEOUT_S + 15
    if how == signal.SIGSTOP:
        os.kill(pids[1], signal.SIGKILL)
    assert proc.wait() == 1
    log = proc.stderr()
    codes = rank_exit_codes(log)
    assert codes[1] == -9, log[-3000:]  # torchrun's report names the lost rank
    assert "Traceback" not in log.split("torch/distributed/elastic")[0].split(lost)[0][-2000:]
    # Nothing was sealed after the loss; every sealed checkpoint is intact.
    assert set(intact_steps(d.ckpt)) >= sealed_before and set(sealed_steps(d.ckpt)) == set(intact_steps(d.ckpt))
    return intact_steps(d.ckpt)[-1]
