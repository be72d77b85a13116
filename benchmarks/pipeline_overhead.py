"""Pipeline overhead: ``kubetune pipeline run --local`` wall time minus the stages' own time.

    python -m benchmarks.pipeline_overhead [--quick] [--repeats 1] [--out FILE]

Runs the whole KFP graph locally (``kfp.local.SubprocessRunner``: each task is a subprocess) on the tiny real model
``../shared/data/stories260K/hf`` with tiny settings (40 rows, max_length 128, 2 training steps), so the stages' own
work is small and the overhead is what remains. The stages' own time is measured inside each task process by a
benchmark-only import hook (``benchmarks/stage_timer/sitecustomize.py`` on ``PYTHONPATH``) that times the library
calls: ``prepare``, ``components.runtime.decide`` (check-unchanged), ``pack``, ``train``, ``evaluate``,
``register``. Per task, kfp's own log lines ("Executing task", "finished with status") give the task's wall time,
so the overhead splits into per-task overhead (process start, imports and the KFP executor before the stage call,
artifact bookkeeping after it) and the orchestration between tasks (the CLI's own start-up, compiling the graph,
kfp.local's bookkeeping). ``import_seconds`` is what one bare ``import`` of the task's libraries costs here.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import BenchError, Recorder, progress

TIMER_DIR = Path(__file__).resolve().parent / "stage_timer"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXEC = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - INFO - Executing task '([^']+)'")
_DONE = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - (?:INFO|ERROR) - Task '([^']+)' finished with status (\w+)")
# Which library call is each task's own work.
TASK_STAGE = {
    "prepare": "kubetune.prepare.prepare",
    "prepare-fresh": "kubetune.prepare.prepare",
    "check-unchanged": "components.runtime.decide",
    "pack": "kubetune.pack.pack",
    "train-cpu": "kubetune.train.train",
    "train-gpu": "kubetune.train.train",
    "evaluate": "kubetune.evaluation.evaluate",
    "register": "kubetune.register.register",
}


def write_config(work: Path, model: Path, rows: int, steps: int) -> Path:
    data = work / "rows.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."}) + "\n"
            for i in range(rows)
        )
    )
    config = work / "tiny.yaml"
    config.write_text(
        f"model: {{name_or_path: {model}}}\n"
        f"data: {{path: {data}, eval_size: 8}}\n"
        "pack: {max_length: 128}\n"
        "lora: {r: 4, alpha: 8}\n"
        f"train: {{max_steps: {steps}, batch_size: 2, save_steps: {steps}}}\n"
        "eval: {max_rows: 4, num_samples: 1, max_new_tokens: 8}\n"
        f"tracking: {{uri: 'sqlite:///{work}/mlflow.db', experiment: bench-overhead, registered_model: bench}}\n"
    )
    return config


def _kubetune_cmd() -> list[str]:
    script = Path(sys.executable).parent / "kubetune"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "kubetune.cli"]


def _clock(stamp: str, day: datetime) -> datetime:
    t = datetime.strptime(stamp, "%H:%M:%S.%f")
    return day.replace(hour=t.hour, minute=t.minute, second=t.second, microsecond=t.microsecond)


def task_walls(log_text: str, day: datetime) -> dict[str, float]:
    """Task wall times from kfp.local's log lines (``HH:MM:SS.mmm - INFO - Executing task 'x'`` ... finished)."""
    started: dict[str, datetime] = {}
    walls: dict[str, float] = {}
    for line in _ANSI.sub("", log_text).splitlines():
        if m := _EXEC.match(line):
            started[m.group(2)] = _clock(m.group(1), day)
        elif (m := _DONE.match(line)) and m.group(2) in started:
            end = _clock(m.group(1), day)
            if end < started[m.group(2)]:
                end += timedelta(days=1)
            walls[m.group(2)] = (end - started[m.group(2)]).total_seconds()
    return walls


def import_seconds() -> float:
    """One bare import of what a training task imports: the floor of every task's start-up cost here."""
    code = "import kfp, torch, transformers, peft, trl, datasets, kubetune.train, components.stages"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=common.ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


def run_once(config: Path, root: Path, log: Path, *, force: bool, timeout_s: float) -> dict[str, Any]:
    times_file = root.parent / f"{root.name}-stage-times.jsonl"
    times_file.unlink(missing_ok=True)
    env = {
        **_env(),
        "PYTHONPATH": f"{TIMER_DIR}:{common.ROOT}",
        "KUBETUNE_BENCH_STAGE_TIMES": str(times_file),
    }
    cmd = [*_kubetune_cmd(), "pipeline", "run", "--local", "--config", str(config), "--root", str(root)]
    if force:
        cmd.append("--force")
    day = datetime.now()
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run(cmd, cwd=common.ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s)
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n  ".join(text.splitlines()[-20:])
        raise BenchError(f"pipeline run failed with exit code {proc.returncode} (log: {log})\n  {tail}")
    stages: dict[str, float] = {}
    startup: dict[str, float] = {}
    if times_file.is_file():
        for line in times_file.read_text().splitlines():
            entry = json.loads(line)
            stages[entry["stage"]] = stages.get(entry["stage"], 0.0) + entry["seconds"]
            startup[entry["stage"]] = entry["start"] - entry["process_start"]
    walls = task_walls(text, day)
    if not stages:
        raise BenchError(f"no stage times were recorded (hook {TIMER_DIR} not loaded?); log: {log}")
    return {"wall": wall, "stages": stages, "startup": startup, "tasks": walls}


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_overhead", description=__doc__.split("\n\n")[0])
    common.common_args(p)
    p.add_argument("--model", type=Path, default=common.STORIES, help="a small model folder")
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs after the first (each with --force)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 0
        args.quiet_wait = min(args.quiet_wait, 15.0)
    return args


def run(args: argparse.Namespace, rec: Recorder) -> list[dict[str, Any]]:
    if not (Path(args.model) / "config.json").is_file():
        raise BenchError(f"{args.model}: not a model folder (the tiny model lives in ../shared/data/stories260K/hf)")
    work = common.make_workdir(args.workdir, "pipeline")
    records = []
    try:
        config = write_config(work, Path(args.model).resolve(), args.rows, args.train_steps)
        imports = import_seconds()
        for i in range(1 + args.repeats):
            name = "first run" if i == 0 else f"forced re-run #{i}"
            quiet = common.wait_for_quiet(args.quiet_wait) if args.quiet_wait else {}
            progress(f"pipeline: {name} (CPUs busy before: {quiet.get('busy_before')})")
            got = run_once(config, work / "root", work / f"pipeline-{i}.log", force=i > 0, timeout_s=args.timeout)
            stage_total = sum(got["stages"].values())
            task_total = sum(got["tasks"].values())
            per_task = {}
            for task, wall in got["tasks"].items():
                own = got["stages"].get(TASK_STAGE.get(task, ""), 0.0)
                per_task[task] = {
                    "wall": round(wall, 2),
                    "stage": round(own, 2),
                    "overhead": round(wall - own, 2),
                    "imports": round(got["startup"].get(TASK_STAGE.get(task, ""), 0.0), 2),
                }
            records.append(
                rec.emit(
                    {
                        "bench": "pipeline",
                        "name": name,
                        "wall_seconds": round(got["wall"], 1),
                        "stage_seconds": round(stage_total, 1),
                        "overhead_seconds": round(got["wall"] - stage_total, 1),
                        "task_overhead_seconds": round(task_total - stage_total, 1),
                        "orchestration_seconds": round(got["wall"] - task_total, 1),
                        "tasks": len(got["tasks"]),
                        "per_task": per_task,
                        "import_seconds": round(imports, 1),
                        "target_seconds": 10,
                        **quiet,
                    }
                )
            )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return records


PIPELINE_COLUMNS = [
    ("run", "name"),
    ("wall s", "wall_seconds"),
    ("stages s", "stage_seconds"),
    ("overhead s", "overhead_seconds"),
    ("per-task overhead s", "task_overhead_seconds"),
    ("orchestration s", "orchestration_seconds"),
    ("tasks", "tasks"),
    ("one import s", "import_seconds"),
    ("load avg", "load_avg"),
]


def tables(records: list[dict[str, Any]]) -> str:
    rows = [r for r in records if r["bench"] == "pipeline"]
    out = common.tables(rows, [("Local pipeline overhead", PIPELINE_COLUMNS, "pipeline")])
    if rows:
        task_rows = [{"name": t, **v} for t, v in rows[0]["per_task"].items()]
        out += "\n" + common.table(
            f"Per task ({rows[0]['name']})",
            [
                ("task", "name"),
                ("wall s", "wall"),
                ("stage s", "stage"),
                ("overhead s", "overhead"),
                ("of which start-up to stage call s", "imports"),
            ],
            task_rows,
        )
    return out


def main(argv=None) -> int:
    return common.bench_main(
        argv,
        section="pipeline",
        parse_args=parse_args,
        run=run,
        tables=tables,
        errors=(BenchError, subprocess.TimeoutExpired),
    )


if __name__ == "__main__":
    raise SystemExit(main())
