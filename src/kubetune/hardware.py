"""What this machine can do: the facts the train stage's plan (:mod:`kubetune.plan`) is made from.

:func:`detect` reads them once: the device (CUDA or CPU), the CPU's flags (AMX, AVX512-BF16), the cores this process
may use (affinity and cgroup quota, not the host's count), the memory available (cgroup limit, else free memory), the
CPU's fp32 and bf16 matmul rates where the precision choice needs them (a CPU with AVX512-BF16 but no AMX) and the
malloc in force. Everything a decision reads is a field of :class:`Hardware`, so a plan can be made for any machine
from hand-written facts. :func:`overrides` reads the two user-facing overrides (``KUBETUNE_CPU_FLAGS``,
``KUBETUNE_MATMUL_GFLOPS``) from an environment mapping; the command line and the pipeline's train component pass
them to :func:`detect`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def read_cpu_flags() -> set[str]:
    """Flags of the first CPU in /proc/cpuinfo (empty on non-Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by the cgroup quota (v2 cpu.max, or v1 cfs quota/period), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def usable_cores() -> int:
    """Cores this process may use: affinity mask, capped by the cgroup quota (rounded down, at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.floor(limit)))
    return max(1, n)


@dataclass(frozen=True)
class Hardware:
    device: str  # "cpu" or "cuda"
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    cores: int = 1
    cuda_name: str | None = None
    cuda_bf16: bool = False
    cuda_memory_bytes: int | None = None
    # CPU fp32 and bf16 matmul GFLOP/s, measured where the precision choice needs them (None: not measured)
    matmul_gflops: dict[str, float] | None = None
    # bytes this process may still allocate (None: not known, nothing is held back for memory)
    memory_bytes: int | None = None

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.cpu_flags or "amx_tile" in self.cpu_flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.cpu_flags

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["cpu_flags"] = sorted(f for f in self.cpu_flags if f.startswith(("amx", "avx512_bf16", "avx512f")))
        d["amx"] = self.amx
        return d


def detect(
    cpu_flags: set[str] | None = None,
    use_cuda: bool | None = None,
    matmul_gflops: dict[str, float] | None = None,
    *,
    measure: bool = True,
) -> Hardware:
    """Probe the machine. ``use_cuda=None`` uses CUDA when torch sees a device; ``cpu_flags`` and ``matmul_gflops``
    given replace what would be read or measured (see :func:`overrides`); ``measure=False`` skips the matmul probe
    (for inference, which does not need it)."""
    import torch

    flags = frozenset(read_cpu_flags() if cpu_flags is None else cpu_flags)
    cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    cores = usable_cores()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        return Hardware(
            "cuda", flags, cores, props.name, torch.cuda.is_bf16_supported(), props.total_memory,
            memory_bytes=props.total_memory,
        )  # fmt: skip
    if measure and matmul_gflops is None and "avx512_bf16" in flags and not ({"amx_bf16", "amx_tile"} & flags):
        matmul_gflops = cpu_matmul_rates(cores)
    return Hardware("cpu", flags, cores, matmul_gflops=matmul_gflops, memory_bytes=available_memory_bytes())


CPU_FLAGS_ENV = "KUBETUNE_CPU_FLAGS"
MATMUL_GFLOPS_ENV = "KUBETUNE_MATMUL_GFLOPS"


def overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """:func:`detect`'s arguments from the user-facing overrides in ``environ``: ``KUBETUNE_CPU_FLAGS`` (space-
    separated flags that replace /proc/cpuinfo's) and ``KUBETUNE_MATMUL_GFLOPS="fp32=218,bf16=945"`` (rates that
    replace the probe), e.g. to pin one precision across a node pool of mixed CPUs."""
    from kubetune.errors import UserError

    out: dict[str, Any] = {}
    if environ.get(CPU_FLAGS_ENV) is not None:
        out["cpu_flags"] = set(environ[CPU_FLAGS_ENV].split())
    raw = environ.get(MATMUL_GFLOPS_ENV)
    if raw:
        try:
            rates = {k.strip(): float(v) for k, v in (item.split("=", 1) for item in raw.split(","))}
            out["matmul_gflops"] = {"fp32": rates["fp32"], "bf16": rates["bf16"]}
        except (ValueError, KeyError):
            raise UserError(f"{MATMUL_GFLOPS_ENV}={raw!r}: expected 'fp32=<GFLOP/s>,bf16=<GFLOP/s>'") from None
    return out


@dataclass(frozen=True)
class Decision:
    value: Any
    reason: str


def matmul_gflops(
    dtype: str, threads: int, *, device: str = "cpu", size: int = 1024, seconds: float = 0.05, repeats: int = 3
) -> float:
    """Best GFLOP/s of a square ``size`` matmul in ``dtype`` (``fp32``/``bf16``/``fp16``) on ``threads`` threads (or
    the GPU), over ``repeats`` windows of ``seconds``: a neighbour's burst lowers single windows, never raises them."""
    import time

    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        a = torch.randn(size, size, device=device).to(dt)
        b = torch.randn(size, size, device=device).to(dt)
        torch.mm(a, b)
        sync()
        best = 0.0
        for _ in range(repeats):
            rounds, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                torch.mm(a, b)
                rounds += 1
                sync()
            best = max(best, 2 * size**3 * rounds / (time.perf_counter() - t0) / 1e9)
        return float(f"{best:.4g}")
    finally:
        torch.set_num_threads(old)


_RATES: dict[int, dict[str, float]] = {}


def cpu_matmul_rates(threads: int) -> dict[str, float]:
    """fp32 and bf16 matmul GFLOP/s on ``threads`` threads, measured once per process (~0.3 s)."""
    if threads not in _RATES:
        _RATES[threads] = {d: matmul_gflops(d, threads) for d in ("fp32", "bf16")}
    return _RATES[threads]


def available_memory_bytes() -> int:
    """Bytes this process may still allocate: free memory, capped by the cgroup's limit."""
    limit = None
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(p).read_text().strip()
            if raw != "max" and int(raw) < 1 << 60:
                limit = int(raw)
                break
        except (OSError, ValueError):
            continue
    import psutil

    avail = psutil.virtual_memory().available
    return min(avail, limit) if limit else avail
