"""Fixtures for the reliability tests: a small workspace (tiny Llama, prepared and packed data, a config file) and
uninterrupted reference runs to compare interrupted ones against."""

from __future__ import annotations

from pathlib import Path

import pytest

from .procs import Workspace, run


@pytest.fixture(scope="session")
def ws(tmp_path_factory, tiny_model_dir) -> Workspace:
    """Tiny Llama, 64 short conversations (60 train, 4 eval), prepared and packed once (in-process) per session."""
    root = tmp_path_factory.mktemp("reliability")
    return Workspace.make(root, tiny_model_dir, train={"batch_size": 2, "logging_steps": 5})


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
