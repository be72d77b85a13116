"""Fixtures for the reliability tests: a small workspace (tiny Llama, prepared and packed data, a config file) and
uninterrupted reference runs to compare interrupted ones against."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .procs import MAX_STEPS, SAVE_STEPS, Workspace, run


@pytest.fixture(scope="session")
def ws(tmp_path_factory, tiny_model_dir) -> Workspace:
    """Tiny Llama, 64 short conversations (60 train, 4 eval), prepared and packed once (in-process) per session."""
    from kubetune import config
    from kubetune.pack import pack
    from kubetune.prepare import prepare

    root = tmp_path_factory.mktemp("reliability")
    data = root / "data.jsonl"
    rows = [
        {"instruction": f"what is {i} plus {i}?", "response": f"the answer is {2 * i}. " * (1 + i % 3)}
        for i in range(64)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"path": str(data), "eval_size": 4},
        "pack": {"max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "max_steps": MAX_STEPS,
            "save_steps": SAVE_STEPS,
            "save_total_limit": 3,
            "batch_size": 2,
            "threads": 1,
            "learning_rate": 0.01,
            "warmup_ratio": 0.1,
            "logging_steps": 5,
        },
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
def reference(ws, tmp_path_factory):
    """``reference(dropout)``: the adapter of an uninterrupted run (one per dropout, made once, on first use)."""
    made: dict[float, Path] = {}

    def get(dropout: float) -> Path:
        if dropout not in made:
            d = tmp_path_factory.mktemp(f"reference-{dropout}")
            r = run(*ws.train_args(d / "adapter", d / "checkpoints", "--set", f"lora.dropout={dropout}"))
            assert r.returncode == 0, r.stderr[-3000:]
            made[dropout] = d / "adapter"
        return made[dropout]

    return get
