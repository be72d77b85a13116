"""The memory allocator of a process that trains or loads a model on a CPU.

tcmalloc (gperftools), where it is installed, is preloaded into the processes that load a model
(:func:`allocator_preload_env`: the ``kubetune`` command restarts itself under it; the CPU image sets it);
``KUBETUNE_ALLOCATOR=system`` keeps the C library's. On CPU with glibc's malloc, large buffers are served from memory
maps that go back to the kernel when freed (:func:`decide`, :func:`apply`); while a model loads, freed heap pages are
handed back (:func:`trimming_heap`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

from kubetune.hardware import Decision, Hardware

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


def decide(hw: Hardware) -> Decision:
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

    if _libc("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int) is None:
        return Decision("default", "no glibc mallopt on this system")
    return Decision(
        TUNED_ALLOCATOR,
        "glibc malloc returns freed activation buffers of 8 MiB and more to the kernel (measured: 0.85x training "
        "RSS for 0.96x tokens/s); MALLOC_MMAP_THRESHOLD_ in the environment overrides",
    )


def apply(decision: Decision) -> Decision:
    """Put :func:`decide`'s choice into effect (glibc's mmap threshold; nothing to do for the others); returns the
    setting in force, which is glibc's default where ``mallopt`` refuses."""
    if decision.value != TUNED_ALLOCATOR:
        return decision
    import ctypes

    mallopt = _libc("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    if mallopt is None or mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        return Decision("default", "mallopt(M_MMAP_THRESHOLD) was refused")
    return decision


def apply_allocator_setting(hw: Hardware) -> Decision:
    """:func:`decide` and :func:`apply` in one, as the train stage does before it loads a model."""
    return apply(decide(hw))


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
    from :func:`apply`: glibc tuned, or tcmalloc); not during training, where returned pages
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
