"""Fixtures for the distributed tests: the real tiny pretrained Llama from ../shared/data (stories260K), 60 short
conversations prepared and packed once, and the runs several tests read: one process, and two ranks on two
torchrun agents (``--nnodes 2``) whose second node writes into folders of its own."""

from __future__ import annotations

import json

import pytest
import yaml
from reliability.procs import Workspace

from .runs import MAX_STEPS, SAVE_STEPS, TIMEOUT_S, Dirs, free_port, one_process, run, start, torchrun


@pytest.fixture(scope="session")
def dws(tmp_path_factory, stories_dir) -> Workspace:
    from kubetune import config
    from kubetune.pack import pack
    from kubetune.prepare import prepare

    root = tmp_path_factory.mktemp("distributed")
    data = root / "data.jsonl"
    rows = [
        {"instruction": f"what is {i} plus {i}?", "response": f"the answer is {2 * i}. " * (1 + i % 3)}
        for i in range(64)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {
        "model": {"name_or_path": str(stories_dir)},
        "data": {"path": str(data), "eval_size": 4},
        "pack": {"max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "max_steps": MAX_STEPS,
            "save_steps": SAVE_STEPS,
            "save_total_limit": 3,
            "batch_size": 4,  # the global batch: 2 rows per rank on 2 ranks
            "threads": 1,
            "learning_rate": 0.01,
            "warmup_ratio": 0.1,
            "logging_steps": 1,
        },
        "distributed": {"timeout_s": TIMEOUT_S},
        "output_dir": str(root / "run"),
        "tracking": {"enabled": False},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = config.load(path)
    prepared = prepare(loaded, root / "prepared")
    packed = pack(loaded, prepared, root / "packed")
    return Workspace(root, path, data, prepared, packed)


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
