"""What this machine can do, and the training settings that follow from it.

The decisions (each recorded with its reason in the training summary):
- precision: CUDA with bf16 -> bf16; CUDA without -> fp16; CPU with AMX (``amx_bf16`` in the CPU flags, e.g. a GKE C3
  Sapphire Rapids node) -> bf16; any other CPU -> fp32, because without AMX bf16 matmuls run at about half the fp32 rate
  (measured: 165 vs 320 GFLOP/s on 2 AVX-512 cores).
- threads: the cores this process may run on (cgroup CPU quota and affinity), not the host's core count: a pod limited
  to 4 CPUs on a 176-core node must not start 176 threads.
- activation checkpointing: on only when asked, or when the estimated activation memory would not fit.

Tests fake the CPU flags by passing ``cpu_flags=`` or setting ``KUBETUNE_CPU_FLAGS`` (space-separated).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def read_cpu_flags() -> set[str]:
    """Flags of the first CPU in /proc/cpuinfo (empty on non-Linux). ``KUBETUNE_CPU_FLAGS`` overrides, for tests."""
    override = os.environ.get("KUBETUNE_CPU_FLAGS")
    if override is not None:
        return set(override.split())
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


def detect(cpu_flags: set[str] | None = None, use_cuda: bool | None = None) -> Hardware:
    """Probe the machine. ``use_cuda=None`` uses CUDA when torch sees a device."""
    import torch

    flags = frozenset(read_cpu_flags() if cpu_flags is None else cpu_flags)
    cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if cuda:
        props = torch.cuda.get_device_properties(0)
        return Hardware("cuda", flags, usable_cores(), props.name, torch.cuda.is_bf16_supported(), props.total_memory)
    return Hardware("cpu", flags, usable_cores())


@dataclass(frozen=True)
class Decision:
    value: Any
    reason: str


def choose_precision(hw: Hardware, requested: str = "auto") -> Decision:
    """fp32 | bf16 | fp16 for training, with the reason."""
    if requested != "auto":
        return Decision(requested, "set in config (train.precision)")
    if hw.device == "cuda":
        if hw.cuda_bf16:
            return Decision("bf16", f"CUDA device {hw.cuda_name} supports bf16")
        return Decision("fp16", f"CUDA device {hw.cuda_name} lacks bf16")
    if hw.amx:
        return Decision("bf16", "CPU has AMX (amx_bf16): bf16 matmuls run on the tile units")
    return Decision("fp32", "CPU has no AMX: bf16 matmuls run at about half the fp32 rate here")


def choose_threads(hw: Hardware, requested: int = 0) -> Decision:
    if requested:
        return Decision(requested, "set in config (train.threads)")
    return Decision(hw.cores, "cores this process may use (affinity and cgroup quota)")


def available_memory_bytes(hw: Hardware) -> int:
    if hw.device == "cuda" and hw.cuda_memory_bytes:
        return hw.cuda_memory_bytes
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


def choose_activation_checkpointing(
    hw: Hardware, requested: str, *, activation_bytes: int, weight_bytes: int
) -> Decision:
    """On when asked, or when weights + activations would use more than 80% of the memory there is."""
    if requested == "on":
        return Decision(True, "set in config (train.activation_checkpointing: on)")
    if requested == "off":
        return Decision(False, "set in config (train.activation_checkpointing: off)")
    budget = int(available_memory_bytes(hw) * 0.8)
    need = activation_bytes + weight_bytes
    gib = 1 << 30
    if need > budget:
        return Decision(
            True,
            f"estimated {need / gib:.1f} GiB of weights + activations exceeds 80% of the "
            f"{budget / 0.8 / gib:.1f} GiB available",
        )
    return Decision(
        False,
        f"estimated {need / gib:.1f} GiB fits in the {budget / 0.8 / gib:.1f} GiB available; "
        "recomputation would only cost time",
    )
