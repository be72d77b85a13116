"""What this machine can do, and the training settings that follow from it.

The decisions (each recorded with its reason in the training summary):
- precision: CUDA with bf16 -> bf16; CUDA without -> fp16; CPU with AMX (``amx_bf16`` in the CPU flags, e.g. a GKE C3
  Sapphire Rapids node) -> bf16; CPU with AVX512-BF16 but no AMX -> bf16 only when a short matmul probe finds it at
  least 1.3x faster than fp32 (it is half the fp32 rate on some such CPUs, 4.3x on others); any other CPU -> fp32.
- threads: the cores this process may run on (cgroup CPU quota and affinity), not the host's core count: a pod limited
  to 4 CPUs on a 176-core node must not start 176 threads.
- activation checkpointing: on only when asked, or when the estimated activation memory would not fit.
- allocator: tcmalloc, where it is installed, is preloaded into the processes that load a model
  (``allocator_preload_env``: the ``kubetune`` command restarts itself under it; the CPU image sets it);
  ``KUBETUNE_ALLOCATOR=system`` keeps the C library's. On CPU with glibc's malloc, large buffers are served from
  memory maps that go back to the kernel when freed (``apply_allocator_setting``).

Tests fake the CPU flags by passing ``cpu_flags=`` or setting ``KUBETUNE_CPU_FLAGS`` (space-separated), and the
matmul probe by setting ``KUBETUNE_MATMUL_GFLOPS``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from collections.abc import Iterator
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


# bf16 is chosen over fp32 on a CPU without AMX only when its matmuls are at least this much faster.
BF16_MIN_SPEEDUP = 1.3


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


def matmul_gflops(
    dtype: str, threads: int, *, device: str = "cpu", size: int = 1024, seconds: float = 0.05, repeats: int = 3
) -> float:
    """Best GFLOP/s of a square ``size`` matmul (see :func:`gemm_gflops`)."""
    return gemm_gflops([(size, size, size)], dtype, threads, device=device, seconds=seconds, repeats=repeats)


_RATES: dict[int, dict[str, float]] = {}


def cpu_matmul_rates(threads: int) -> dict[str, float]:
    """fp32 and bf16 matmul GFLOP/s on ``threads`` threads, measured once per process (~0.3 s).

    ``KUBETUNE_MATMUL_GFLOPS="fp32=218,bf16=945"`` replaces the measurement (for tests, or to pin the choice)."""
    override = os.environ.get("KUBETUNE_MATMUL_GFLOPS")
    if override:
        try:
            rates = {k.strip(): float(v) for k, v in (item.split("=", 1) for item in override.split(","))}
            return {"fp32": rates["fp32"], "bf16": rates["bf16"]}
        except (ValueError, KeyError):
            raise ValueError(f"KUBETUNE_MATMUL_GFLOPS={override!r}: expected 'fp32=<GFLOP/s>,bf16=<GFLOP/s>'") from None
    if threads not in _RATES:
        _RATES[threads] = {d: matmul_gflops(d, threads) for d in ("fp32", "bf16")}
    return _RATES[threads]


def choose_precision(hw: Hardware, requested: str = "auto") -> Decision:
    """fp32 | bf16 | fp16 for training, with the reason.

    CPUs without AMX are not all alike: with AVX512-BF16 bf16 matmuls ran at half the fp32 rate on one machine
    (Intel, oneDNN's bf16 path against MKL's AVX-512 fp32) and at 4.3x on another (AMD Zen 5, where MKL's fp32 path
    stops at AVX2). So there the choice is measured, not inferred from the flags."""
    if requested != "auto":
        return Decision(requested, "set in config (train.precision)")
    if hw.device == "cuda":
        if hw.cuda_bf16:
            return Decision("bf16", f"CUDA device {hw.cuda_name} supports bf16")
        return Decision("fp16", f"CUDA device {hw.cuda_name} lacks bf16")
    if hw.amx:
        return Decision("bf16", "CPU has AMX (amx_bf16): bf16 matmuls run on the tile units")
    if not hw.avx512_bf16:
        return Decision("fp32", "CPU has neither AMX nor AVX512-BF16: bf16 matmuls would be emulated, slower than fp32")
    rates = cpu_matmul_rates(hw.cores)
    measured = f"bf16 {rates['bf16']:g} vs fp32 {rates['fp32']:g} GFLOP/s on {hw.cores} threads"
    if rates["bf16"] >= BF16_MIN_SPEEDUP * rates["fp32"]:
        return Decision("bf16", f"CPU has AVX512-BF16, no AMX; bf16 matmuls measured faster ({measured})")
    return Decision("fp32", f"CPU has AVX512-BF16, no AMX; bf16 matmuls measured no faster ({measured})")


# glibc's mallopt parameter, and the threshold kubetune sets for CPU training (see apply_allocator_setting).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 8 << 20
# the allocator decision's value where kubetune manages glibc's malloc
TUNED_ALLOCATOR = f"mmap threshold {MMAP_THRESHOLD_BYTES >> 20} MiB"


def _libc(name: str, argtypes: tuple, restype):
    """A function of the C library this process runs on (None where there is none by that name, e.g. no glibc)."""
    import ctypes

    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


# ---- the memory allocator -------------------------------------------------------------------------------------
# tcmalloc (gperftools) as the malloc of processes that train or load a model: preloaded when the process starts
# (``allocator_preload_env``; the ``kubetune`` CLI restarts itself with it, the CPU image sets it), which is the
# only way to replace malloc for everything torch allocates. Measured on the AMX VM (docs/performance.md, fourth
# round): LoRA on SmolLM2-135M 1.10x the tokens/s of glibc's malloc with kubetune's 8 MiB threshold; on a 1.1B
# Llama, LoRA-bf16 / QLoRA peak RSS 0.90x / 0.82x and steps 1.28x / 1.12x faster.
ALLOCATOR_ENV = "KUBETUNE_ALLOCATOR"
ALLOCATOR_CHOICES = ("auto", "tcmalloc", "system")
# set by allocator_preload_env beside LD_PRELOAD, so the process knows who preloaded its allocator
PRELOADED_BY_ENV = "KUBETUNE_PRELOADED_ALLOCATOR"
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# allocators that replace glibc's malloc when preloaded, by the name their library files carry
_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
# tcmalloc logs every allocation over 1 GiB by default (a large model's weights): reporting is turned off instead
_TCMALLOC_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 50)}


def find_tcmalloc(environ: dict[str, str] | None = None) -> str | None:
    """Path of an installed tcmalloc (``libtcmalloc-minimal4`` on Debian/Ubuntu, ``gperftools`` elsewhere, or in
    this Python's prefix as conda installs it), searched in ``LD_LIBRARY_PATH`` first; None where there is none."""
    env = os.environ if environ is None else environ
    dirs = [d for d in env.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs += [os.path.join(sys.prefix, "lib"), *_LIBRARY_DIRS]
    for folder in dirs:
        for name in TCMALLOC_NAMES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def allocator_preload_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The variables to start a training process with so that tcmalloc is its malloc (``LD_PRELOAD`` and a quiet
    large-allocation report), or None where it should start as it is: ``KUBETUNE_ALLOCATOR=system``, an allocator
    already preloaded (kubetune's or the user's), not Linux, or (with ``auto``, the default) no tcmalloc installed.
    ``KUBETUNE_ALLOCATOR=tcmalloc`` makes a missing tcmalloc an error; any other value is one."""
    from kubetune.errors import UserError

    env = os.environ if environ is None else environ
    choice = env.get(ALLOCATOR_ENV, "auto").strip().lower() or "auto"
    if choice not in ALLOCATOR_CHOICES:
        raise UserError(
            f"{ALLOCATOR_ENV}={env[ALLOCATOR_ENV]!r} is not an allocator choice: use auto (tcmalloc where installed), "
            "tcmalloc (required) or system (the C library's malloc)"
        )
    preload = env.get("LD_PRELOAD", "")
    if choice == "system" or any(name in preload for name in _ALLOCATORS):
        return None
    lib = find_tcmalloc(env) if sys.platform.startswith("linux") else None
    if lib is None:
        if choice == "tcmalloc":
            raise UserError(
                f"{ALLOCATOR_ENV}=tcmalloc, but no {' or '.join(TCMALLOC_NAMES)} was found in LD_LIBRARY_PATH, "
                f"{os.path.join(sys.prefix, 'lib')} or the system library folders: install it (Debian/Ubuntu: "
                f"apt-get install libtcmalloc-minimal4) or set {ALLOCATOR_ENV}=auto"
            )
        return None
    return {"LD_PRELOAD": f"{lib} {preload}".strip(), PRELOADED_BY_ENV: lib, **_TCMALLOC_QUIET}


def loaded_allocator() -> str | None:
    """Path of the malloc-replacing library (tcmalloc, jemalloc, mimalloc) mapped into this process, from
    ``/proc/self/maps``: what actually loaded, not what ``LD_PRELOAD`` asked for. None under the C library's
    malloc or where the maps cannot be read."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            for line in fh:
                path = line.rstrip("\n").partition("/")[2]
                if path and any(name in os.path.basename(path) for name in _ALLOCATORS):
                    return "/" + path
    except OSError:
        pass
    return None


def _same_library(named: str, mapped: str) -> bool:
    """Whether ``named`` (a path, or a bare file name that the dynamic loader searches for, as in ``LD_PRELOAD``)
    is the ``mapped`` file: maps show the file behind a ``.so.4`` link, e.g. ``libtcmalloc_minimal.so.4.5.10``."""
    if not named:
        return False
    if "/" not in named:
        return os.path.basename(mapped).startswith(named)
    return os.path.realpath(named) == os.path.realpath(mapped)


def _allocator_name(path: str) -> str:
    return next(name for name in _ALLOCATORS if name in os.path.basename(path))


def apply_allocator_setting(hw: Hardware) -> Decision:
    """CPU training: under a preloaded allocator (tcmalloc, which kubetune preloads where it is installed, or one
    the user preloaded) nothing to do; with glibc's malloc, serve allocations of 8 MiB and more from their own
    memory maps, returned to the kernel when freed (``mallopt(M_MMAP_THRESHOLD)``), instead of glibc's default,
    whose threshold grows with the first large frees until big activation buffers stay in heaps that never shrink.
    Measured on SmolLM2-135M, 512-token rows in bf16: training RSS 0.85x for 0.96x the tokens/s (a 64 KiB threshold:
    0.73x memory at half the speed). Left alone on GPUs, when ``MALLOC_MMAP_THRESHOLD_`` is set in the environment,
    and where there is no glibc ``mallopt``."""
    if hw.device != "cpu":
        return Decision("default", "GPU: the host allocator is not on the training path")
    lib = loaded_allocator()
    if lib:
        name = _allocator_name(lib)
        if _same_library(os.environ.get(PRELOADED_BY_ENV, ""), lib):
            how = (
                f"preloaded by kubetune ({ALLOCATOR_ENV}=auto finds it installed; measured 1.10x the tokens/s "
                f"of glibc's malloc, 0.82-0.90x the peak RSS); {ALLOCATOR_ENV}=system turns it off"
            )
        else:
            how = "preloaded by the environment (LD_PRELOAD)"
        return Decision(name, f"{lib} is this process's malloc, {how}")
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return Decision("environment", f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} set by the user")
    import ctypes

    mallopt = _libc("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    if mallopt is None:
        return Decision("default", "no glibc mallopt on this system")
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        return Decision("default", "mallopt(M_MMAP_THRESHOLD) was refused")
    return Decision(
        TUNED_ALLOCATOR,
        "glibc malloc returns freed activation buffers of 8 MiB and more to the kernel (measured: 0.85x training "
        "RSS for 0.96x tokens/s); MALLOC_MMAP_THRESHOLD_ in the environment overrides",
    )


def _heap_release(allocator: Decision):
    """A call that hands the allocator's free pages back to the kernel, where kubetune manages the allocator:
    glibc's ``malloc_trim(0)`` under its tuned malloc, tcmalloc's ``MallocExtension_ReleaseFreeMemory()``; else None."""
    import ctypes

    if allocator.value == TUNED_ALLOCATOR:
        trim = _libc("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
        return None if trim is None else lambda: trim(0)
    if allocator.value == "tcmalloc":
        return _libc("MallocExtension_ReleaseFreeMemory", (), None)
    return None


@contextlib.contextmanager
def trimming_heap(allocator: Decision, interval_s: float = 0.05) -> Iterator[bool]:
    """While the block runs, and once at its end, hand the pages of the heap that hold only freed memory back to
    the kernel (glibc's ``malloc_trim(0)`` or tcmalloc's ``ReleaseFreeMemory``, from a background thread every
    ``interval_s``); yields whether it does.

    For model loading on a CPU: quantising a checkpoint to 4 bits allocates and frees a full-precision copy of each
    weight, between the 4-bit weights that stay, and the allocator keeps the freed pages. Measured on a 1.1B Llama
    loaded as NF4 (``benchmarks.memory``): with glibc, loading peaked 0.44 GiB above what it left live, and 0.22 GiB
    of freed heap was still resident when training began. Only where kubetune manages the allocator (``allocator``
    from :func:`apply_allocator_setting`: glibc tuned, or tcmalloc); not during training, where returned pages
    would be faulted back in every step (the 64 KiB mmap threshold, which has the same effect, halved the speed)."""
    release = _heap_release(allocator)
    if release is None:
        yield False
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            release()

    worker = threading.Thread(target=loop, name="kubetune-heap-trim", daemon=True)
    worker.start()
    try:
        yield True
    finally:
        stop.set()
        worker.join()
        release()


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


MEMORY_SHARE = 0.8  # of the memory available, what weights + activations may take before kubetune holds back


def fits_in_memory(hw: Hardware, need_bytes: int) -> tuple[bool, int]:
    """Whether ``need_bytes`` fits in :data:`MEMORY_SHARE` of the memory available, and the bytes available."""
    available = available_memory_bytes(hw)
    return need_bytes <= MEMORY_SHARE * available, available


def choose_activation_checkpointing(
    hw: Hardware, requested: str, *, activation_bytes: int, weight_bytes: int
) -> Decision:
    """On when asked, or when weights + activations would use more than 80% of the memory there is."""
    if requested == "on":
        return Decision(True, "set in config (train.activation_checkpointing: on)")
    if requested == "off":
        return Decision(False, "set in config (train.activation_checkpointing: off)")
    need = activation_bytes + weight_bytes
    fits, available = fits_in_memory(hw, need)
    gib = 1 << 30
    if not fits:
        return Decision(
            True,
            f"estimated {need / gib:.1f} GiB of weights + activations exceeds 80% of the "
            f"{available / gib:.1f} GiB available",
        )
    return Decision(
        False,
        f"estimated {need / gib:.1f} GiB fits in the {available / gib:.1f} GiB available; "
        "recomputation would only cost time",
    )
