"""Fixtures for the distributed tests: the real tiny pretrained Llama from ../shared/data (stories260K), 60 short
conversations prepared and packed once (under ``ddp``, the default, and again with ``distributed.strategy: fsdp``),
and the runs several tests read: one process, and two ranks on two torchrun agents (``--nnodes 2``) whose second
node writes into folders of its own, for each strategy."""

from __future__ import annotations

import pytest
from reliability.procs import Workspace

from .runs import MAX_STEPS, SAVE_STEPS, TIMEOUT_S, Dirs, free_port, one_process, run, start, torchrun

TRAIN = {
    "max_steps": MAX_STEPS,
    "save_steps": SAVE_STEPS,
    "batch_size": 4,  # the global batch: 2 rows per rank on 2 ranks
    "logging_steps": 1,
}


@pytest.fixture(scope="session")
def dws(tmp_path_factory, stories_dir) -> Workspace:
    root = tmp_path_factory.mktemp("distributed")
    return Workspace.make(root, stories_dir, train=TRAIN, distributed={"timeout_s": TIMEOUT_S})


@pytest.fixture(scope="session")
def fws(tmp_path_factory, stories_dir) -> Workspace:
    """The same data and settings with ``distributed.strategy: fsdp``."""
    root = tmp_path_factory.mktemp("fsdp")
    return Workspace.make(root, stories_dir, train=TRAIN, distributed={"timeout_s": TIMEOUT_S, "strategy": "fsdp"})


@pytest.fixture(scope="session")
def reference(dws, tmp_path_factory) -> Dirs:
    """One process, uninterrupted: what every distributed run is compared with."""
    d = Dirs.under(tmp_path_factory.mktemp("one-process"))
    r = run(one_process(*dws.train_args(d.out, d.ckpt)))
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.fixture(scope="session")
def fsdp_reference(fws, tmp_path_factory) -> Dirs:
    """One process with ``distributed.strategy: fsdp``: nothing to shard, so it trains as plain (with the CPU layer
    rewrites off, as on any number of ranks under fsdp): what the fsdp runs are compared with."""
    d = Dirs.under(tmp_path_factory.mktemp("fsdp-one-process"))
    r = run(one_process(*fws.train_args(d.out, d.ckpt)))
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.fixture(scope="session")
def two_nodes(dws, tmp_path_factory):
    """Two ranks on two torchrun agents (``--nnodes 2 --nproc-per-node 1``); node 1 is given folders of its own,
    so everything rank 1 writes is in them. Returns (node 0's dirs, node 1's dirs, node 0's log, node 1's log)."""
    return _two_agents(dws, tmp_path_factory.mktemp("two-nodes"))


@pytest.fixture(scope="session")
def fsdp_two_nodes(fws, tmp_path_factory):
    """:func:`two_nodes` with ``distributed.strategy: fsdp``: the base sharded over the two agents' ranks."""
    return _two_agents(fws, tmp_path_factory.mktemp("fsdp-two-nodes"))


def _two_agents(ws: Workspace, root):
    n0, n1 = Dirs.under(root / "node0"), Dirs.under(root / "node1")
    port = free_port()
    agents = [
        start(root, torchrun(*ws.train_args(d.out, d.ckpt), nproc=1, nnodes=2, node_rank=k, port=port), f"node{k}")
        for k, d in enumerate((n0, n1))
    ]
    codes = [a.wait(timeout=300) for a in agents]
    logs = [a.stderr() for a in agents]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    return n0, n1, logs[0], logs[1]
