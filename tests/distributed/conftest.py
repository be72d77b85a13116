"""Fixtures for the distributed tests: the real tiny pretrained Llama from ../shared/data (stories260K), 60 short
conversations prepared and packed once, and the runs several tests read: one process, and two ranks on two
torchrun agents (``--nnodes 2``) whose second node writes into folders of its own."""

from __future__ import annotations

import pytest
from reliability.procs import Workspace

from .runs import MAX_STEPS, SAVE_STEPS, TIMEOUT_S, Dirs, free_port, one_process, run, start, torchrun


@pytest.fixture(scope="session")
def dws(tmp_path_factory, stories_dir) -> Workspace:
    root = tmp_path_factory.mktemp("distributed")
    train = {
        "max_steps": MAX_STEPS,
        "save_steps": SAVE_STEPS,
        "batch_size": 4,  # the global batch: 2 rows per rank on 2 ranks
        "logging_steps": 1,
    }
    return Workspace.make(root, stories_dir, train=train, distributed={"timeout_s": TIMEOUT_S})


@pytest.fixture(scope="session")
def reference(dws, tmp_path_factory) -> Dirs:
    """One process, uninterrupted: what every distributed run is compared with."""
    d = Dirs.under(tmp_path_factory.mktemp("one-process"))
    r = run(one_process(*dws.train_args(d.out, d.ckpt)))
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.fixture(scope="session")
def two_nodes(dws, tmp_path_factory):
    """Two ranks on two torchrun agents (``--nnodes 2 --nproc-per-node 1``); node 1 is given folders of its own,
    so everything rank 1 writes is in them. Returns (node 0's dirs, node 1's dirs, node 0's log, node 1's log)."""
    root = tmp_path_factory.mktemp("two-nodes")
    n0, n1 = Dirs.under(root / "node0"), Dirs.under(root / "node1")
    port = free_port()
    agents = [
        start(root, torchrun(*dws.train_args(d.out, d.ckpt), nproc=1, nnodes=2, node_rank=k, port=port), f"node{k}")
        for k, d in enumerate((n0, n1))
    ]
    codes = [a.wait(timeout=300) for a in agents]
    logs = [a.stderr() for a in agents]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    return n0, n1, logs[0], logs[1]
