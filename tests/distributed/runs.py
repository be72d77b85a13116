"""Helpers for the distributed tests: `kubetune train` under a real torchrun (gloo on CPU), one process as the
reference, the workers' pids by rank, and what torchrun reports about each rank.

Every run uses one thread per rank (``train.threads: 1``) so that one process and N ranks do the same arithmetic.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from reliability.procs import Proc, env, kubetune_cmd, wait_for

MAX_STEPS = 40  # a few seconds: long enough that a signal sent after the first checkpoint lands mid-training
SAVE_STEPS = 5
TIMEOUT_S = 20  # distributed.timeout_s of these runs: no rank may wait longer for a dead peer
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# torchrun's failure report: one block per rank that exited non-zero.
REPORT = re.compile(r"rank\s+: (\d+) \(local_rank: \d+\)\n\s+exitcode\s+: (-?\d+)")


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
