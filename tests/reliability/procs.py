"""Helpers for the reliability tests: the `kubetune` command as a real subprocess, bounded waits, checkpoint
inspection, and the workspace the fixtures in conftest.py build.

Every training run here uses one thread (``train.threads: 1``) so that runs in different processes do exactly the
same arithmetic: an interrupted-and-resumed run can then be compared bit for bit with an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

MAX_STEPS = 100  # long enough (seconds) that a signal sent after the first checkpoint lands mid-training
SAVE_STEPS = 5
WAIT_S = 120.0  # bound on every wait for a process to reach a point


def kubetune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kubetune.cli", *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1"})
    return e


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``kubetune ARGS`` to completion."""
    return subprocess.run(kubetune_cmd(*args), env=env(), capture_output=True, text=True, timeout=timeout)


@dataclass
class Proc:
    """A `kubetune` process running in the background, its stderr going to a file."""

    popen: subprocess.Popen
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.popen.pid, sig)

    def wait(self, timeout: float = WAIT_S) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def start(tmp: Path, *args: str, name: str = "proc") -> Proc:
    path = tmp / f"{name}-{time.monotonic_ns()}.stderr"
    fh = open(path, "w")  # noqa: SIM115 (the child owns it; closed by the OS when it exits)
    p = subprocess.Popen(kubetune_cmd(*args), env=env(), stdout=subprocess.DEVNULL, stderr=fh, text=True)
    fh.close()
    return Proc(p, path)


def wait_for(what: str, cond: Callable[[], bool], proc: Proc | None = None, timeout: float = WAIT_S) -> None:
    """Wait (bounded) until ``cond()``; fail early with the process's stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.popen.poll() is not None:
            pytest.fail(f"process exited ({proc.popen.returncode}) before {what}:\n{proc.stderr()[-3000:]}")
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def sealed_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the checkpoints that carry a completion marker (cheap: what a poller can look at)."""
    return sorted(
        int(p.name.rsplit("-", 1)[1]) for p in ckpt_dir.glob("checkpoint-*") if (p / "kubetune-complete.json").is_file()
    )


def intact_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the checkpoints that pass the full check the trainer does before resuming."""
    from kubetune.checkpoints import checkpoint_problem

    return sorted(
        int(p.name.rsplit("-", 1)[1])
        for p in ckpt_dir.glob("checkpoint-*")
        if p.is_dir() and checkpoint_problem(p) is None
    )


def kubetune_lines(stderr: str) -> list[str]:
    """The lines the CLI itself prints (not the log lines, which carry a timestamp)."""
    return [line for line in stderr.splitlines() if line.startswith("kubetune:")]


PREEMPTED = re.compile(r"^kubetune: preempted at step (\d+), checkpoint (\S+); run the same command again to resume$")


def adapter_tensors(adapter: Path):
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def max_abs_diff(a: Path, b: Path) -> float:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def summary(adapter: Path) -> dict:
    return json.loads((adapter / "training_summary.json").read_text())


@dataclass
class Workspace:
    root: Path
    config: Path
    data: Path
    prepared: Path
    packed: Path

    @classmethod
    def make(cls, root: Path, model_dir: Path, *, train: dict, **sections: dict) -> Workspace:
        """64 short conversations (60 train, 4 eval) for ``model_dir``, prepared and packed once, in-process; the
        config file has the shared test settings, ``train`` keys over them, and any further config ``sections``."""
        import yaml

        from kubetune import config
        from kubetune.pack import pack
        from kubetune.prepare import prepare

        data = root / "data.jsonl"
        rows = [
            {"instruction": f"what is {i} plus {i}?", "response": f"the answer is {2 * i}. " * (1 + i % 3)}
            for i in range(64)
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        cfg = {
            "model": {"name_or_path": str(model_dir)},
            "data": {"path": str(data), "eval_size": 4},
            "pack": {"max_length": 64},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {
                "max_steps": MAX_STEPS,
                "save_steps": SAVE_STEPS,
                "save_total_limit": 3,
                "threads": 1,
                "learning_rate": 0.01,
                "warmup_ratio": 0.1,
                **train,
            },
            **sections,
            "output_dir": str(root / "run"),
            "tracking": {"enabled": False},
        }
        path = root / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        loaded = config.load(path)
        prepared = prepare(loaded, root / "prepared")
        return cls(root, path, data, prepared, pack(loaded, prepared, root / "packed"))

    def train_args(self, out: Path, ckpt: Path, *extra: str) -> list[str]:
        return [
            "train",
            "-c",
            str(self.config),
            "--packed",
            str(self.packed),
            "--out",
            str(out),
            "--set",
            f"train.checkpoint_dir={ckpt}",
            *extra,
        ]
