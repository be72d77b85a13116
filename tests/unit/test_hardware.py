"""Hardware-aware choices, with faked CPU flags."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kubetune import hardware, plan
from kubetune.cpu import allocator
from kubetune.errors import UserError
from kubetune.hardware import Hardware


@pytest.fixture(autouse=True)
def real_detect(monkeypatch):
    """Detection itself, without the session's pinned facts (conftest's machine_facts)."""
    monkeypatch.setattr(hardware, "detect", hardware.detect.func)


def test_amx_cpu_chooses_bf16():
    hw = hardware.detect(cpu_flags={"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, use_cuda=False)
    d = plan.choose_precision(hw)
    assert d.value == "bf16" and "AMX" in d.reason


def test_cpu_without_amx_or_avx512_bf16_chooses_fp32_without_probing(monkeypatch):
    monkeypatch.setattr(hardware, "matmul_gflops", lambda *a, **k: pytest.fail("no probe expected"))
    hw = hardware.detect(cpu_flags={"avx512f", "avx2"}, use_cuda=False)
    d = plan.choose_precision(hw)
    assert d.value == "fp32" and "emulated" in d.reason


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ("fp32=320,bf16=165", "fp32"),  # an Intel VM: bf16 at half the fp32 rate
        ("fp32=218,bf16=945", "bf16"),  # an AMD Zen 5 VM: bf16 at 4.3x
        ("fp32=200,bf16=250", "fp32"),  # faster, but not by enough to be worth the lower precision
    ],
)
def test_avx512_bf16_without_amx_follows_the_measured_rates(rates, expected):
    given = hardware.overrides({"KUBETUNE_MATMUL_GFLOPS": rates})
    hw = hardware.detect(cpu_flags={"avx512f", "avx512_bf16"}, use_cuda=False, **given)
    d = plan.choose_precision(hw)
    assert d.value == expected
    bf16, fp32 = rates.split(",")[1].split("=")[1], rates.split(",")[0].split("=")[1]
    assert f"bf16 {bf16} vs fp32 {fp32} GFLOP/s" in d.reason


def test_the_probe_measures_both_dtypes_once(monkeypatch):
    monkeypatch.setattr(hardware, "_RATES", {})
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    calls = []
    monkeypatch.setattr(hardware, "matmul_gflops", lambda d, t: calls.append((d, t)) or {"fp32": 100, "bf16": 400}[d])
    assert plan.choose_precision(hardware.detect(cpu_flags={"avx512_bf16"}, use_cuda=False)).value == "bf16"
    assert plan.choose_precision(hardware.detect(cpu_flags={"avx512_bf16"}, use_cuda=False)).value == "bf16"
    assert calls == [("fp32", 2), ("bf16", 2)]
    # A CPU whose rate was not measured (facts written by hand) stays in fp32.
    assert plan.choose_precision(Hardware("cpu", frozenset({"avx512_bf16"}), cores=2)).value == "fp32"


def test_matmul_gflops_counts_the_flops_of_every_round(monkeypatch):
    import itertools
    import time

    clock = itertools.count()  # each reading of the clock is one second later
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    # t0 = 0; at 1 s one round runs; at 2 s the 1.5 s window is over; the rate is read at 3 s
    square = hardware.matmul_gflops("fp32", 1, size=8, seconds=1.5, repeats=1)
    assert square == pytest.approx(2 * 8**3 / 3 / 1e9, rel=1e-3)


def test_bad_probe_override_names_the_variable():
    with pytest.raises(UserError, match="KUBETUNE_MATMUL_GFLOPS"):
        hardware.overrides({"KUBETUNE_MATMUL_GFLOPS": "fast"})


def test_cpu_flags_env_override():
    assert hardware.detect(use_cuda=False, **hardware.overrides({"KUBETUNE_CPU_FLAGS": "amx_bf16 avx512f"})).amx
    assert hardware.overrides({}) == {}


def test_cuda_precision():
    assert plan.choose_precision(Hardware("cuda", cuda_name="L4", cuda_bf16=True)).value == "bf16"
    assert plan.choose_precision(Hardware("cuda", cuda_name="T4", cuda_bf16=False)).value == "fp16"


def test_explicit_settings_win():
    hw = Hardware("cpu", frozenset({"amx_bf16"}), cores=4)
    assert plan.choose_precision(hw, "fp32").value == "fp32"
    assert plan.choose_threads(hw, 3).value == 3
    assert plan.choose_threads(hw).value == 4


def test_usable_cores_respects_affinity():
    import os

    assert 1 <= hardware.usable_cores() <= len(os.sched_getaffinity(0))


def test_activation_checkpointing_only_when_needed():
    hw = Hardware("cuda", cuda_name="x", cuda_bf16=True, cuda_memory_bytes=16 << 30)
    small = plan.choose_activation_checkpointing(hw, "auto", activation_bytes=1 << 30, weight_bytes=1 << 30)
    big = plan.choose_activation_checkpointing(hw, "auto", activation_bytes=20 << 30, weight_bytes=1 << 30)
    assert small.value is False and big.value is True and "exceeds" in big.reason
    assert plan.choose_activation_checkpointing(hw, "on", activation_bytes=0, weight_bytes=0).value is True


def test_allocator_setting_on_cpu_with_glibc(monkeypatch):
    import ctypes

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: None)
    if not hasattr(ctypes.CDLL(None), "mallopt"):
        pytest.skip("no glibc mallopt here")
    d = allocator.apply_allocator_setting(Hardware("cpu", cores=2))
    assert d.value == "mmap threshold 8 MiB" and "MALLOC_MMAP_THRESHOLD_" in d.reason


def _fake_libc(monkeypatch, calls):
    """allocator._libc answering malloc_trim and tcmalloc's ReleaseFreeMemory with recorders."""
    import threading

    fakes = {
        "malloc_trim": lambda pad: calls.append(("malloc_trim", pad, threading.get_ident())),
        "MallocExtension_ReleaseFreeMemory": lambda: calls.append(("tcmalloc", 0, threading.get_ident())),
    }
    monkeypatch.setattr(allocator, "_libc", lambda name, *a: fakes.get(name) or pytest.fail(f"{name} called"))


@pytest.mark.parametrize(("value", "call"), [(allocator.TUNED_ALLOCATOR, "malloc_trim"), ("tcmalloc", "tcmalloc")])
def test_heap_is_trimmed_while_loading_and_once_after(monkeypatch, value, call):
    import threading
    import time

    calls = []
    _fake_libc(monkeypatch, calls)
    with allocator.trimming_heap(hardware.Decision(value, ""), interval_s=0.01) as on:
        assert on is True
        time.sleep(0.2)
    during = len(calls)
    assert during >= 3  # from the background thread, while the block ran
    assert {c[:2] for c in calls} == {(call, 0)}
    assert calls[-1][2] == threading.get_ident()  # and once more when it ended, from this thread
    assert not any(t.name == "kubetune-heap-trim" for t in threading.enumerate())
    time.sleep(0.05)
    assert len(calls) == during  # nothing after the block


@pytest.mark.parametrize("value", ["default", "environment", "jemalloc", "mimalloc"])
def test_heap_is_left_alone_where_kubetune_does_not_manage_malloc(monkeypatch, value):
    monkeypatch.setattr(allocator, "_libc", lambda *a: pytest.fail("no release call may be looked up"))
    with allocator.trimming_heap(hardware.Decision(value, "")) as on:
        assert on is False


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="utf-8") as fh:
        return next(int(line.split()[1]) << 10 for line in fh if line.startswith("VmRSS"))


def test_heap_trimming_with_the_real_glibc():
    """Freed heap pages below a live allocation stay resident until malloc_trim returns them: the block does."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "malloc_trim") or not Path("/proc/self/status").is_file():
        pytest.skip("no glibc malloc_trim or /proc here")
    import torch

    kept = [torch.ones(1 << 14) for _ in range(2048)]  # 64 KiB each (128 MiB), from glibc's heap
    pin = torch.ones(1 << 14)  # above them: the heap's top cannot shrink past it
    del kept
    before = _rss_bytes()
    with allocator.trimming_heap(hardware.Decision(allocator.TUNED_ALLOCATOR, ""), interval_s=0.01) as on:
        assert on is True
    assert before - _rss_bytes() > 64 << 20  # measured here: all 128 MiB
    assert pin.sum().item() == 1 << 14


@pytest.mark.parametrize(
    ("env", "loaded", "hw", "expected"),
    [
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, None, Hardware("cpu"), "environment"),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
         Hardware("cpu"), "jemalloc"),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "/opt/lib/libtcmalloc_minimal.so.4.5.10", Hardware("cpu"), "tcmalloc"),
        ({}, None, Hardware("cuda", cuda_name="L4", cuda_bf16=True), "default"),
    ],
    ids=["user-threshold", "jemalloc", "tcmalloc-before-threshold", "gpu"],
)  # fmt: skip
def test_allocator_is_left_alone_where_it_should_be(monkeypatch, env, loaded, hw, expected):
    import ctypes

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: loaded)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a: pytest.fail("mallopt must not be called"))
    d = allocator.apply_allocator_setting(hw)
    assert d.value == expected
    if loaded:
        assert loaded in d.reason and "preloaded by the environment" in d.reason


@pytest.mark.parametrize(
    ("named", "ours"),
    [
        ("{dir}/libtcmalloc_minimal.so.4", True),  # the path kubetune preloaded, a link to the mapped file
        ("libtcmalloc_minimal.so.4", True),  # a bare name, searched by the loader (as the CPU image sets it)
        ("{dir}/other/libtcmalloc_minimal.so.4", False),  # a different file
        ("", False),  # the user's LD_PRELOAD
    ],
)
def test_allocator_decision_names_kubetunes_own_preload(monkeypatch, tmp_path, named, ours):
    mapped = tmp_path / "libtcmalloc_minimal.so.4.5.10"
    mapped.write_bytes(b"")
    (tmp_path / "libtcmalloc_minimal.so.4").symlink_to(mapped.name)
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: str(mapped))
    monkeypatch.setenv(allocator.PRELOADED_BY_ENV, named.format(dir=tmp_path))
    d = allocator.apply_allocator_setting(Hardware("cpu"))
    assert d.value == "tcmalloc" and str(mapped) in d.reason
    if ours:
        assert "preloaded by kubetune" in d.reason and "KUBETUNE_ALLOCATOR=system" in d.reason
    else:
        assert "preloaded by the environment (LD_PRELOAD)" in d.reason


def _library_dir(tmp_path, name="libtcmalloc_minimal.so.4"):
    folder = tmp_path / "lib"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(b"")
    return folder


def test_preload_env_finds_tcmalloc_in_ld_library_path_first(tmp_path):
    folder = _library_dir(tmp_path)
    env = allocator.allocator_preload_env({"LD_LIBRARY_PATH": f"/nonexistent:{folder}", "LD_PRELOAD": "libfoo.so"})
    lib = str(folder / "libtcmalloc_minimal.so.4")
    assert env["LD_PRELOAD"] == f"{lib} libfoo.so"  # kubetune's first, the user's kept
    assert env[allocator.PRELOADED_BY_ENV] == lib
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    # the full gperftools build's name works too
    (tmp_path / "full").mkdir()
    other = _library_dir(tmp_path / "full", "libtcmalloc.so.4")
    assert allocator.find_tcmalloc({"LD_LIBRARY_PATH": str(other)}) == str(other / "libtcmalloc.so.4")


@pytest.mark.parametrize(
    "env",
    [
        {"KUBETUNE_ALLOCATOR": "system"},
        {"KUBETUNE_ALLOCATOR": "auto", "LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
        {"LD_PRELOAD": "/x/libtcmalloc_minimal.so.4"},  # already preloaded: no restart loop
    ],
    ids=["system", "user-jemalloc", "already"],
)
def test_preload_env_leaves_the_process_alone(tmp_path, env):
    folder = _library_dir(tmp_path)
    assert allocator.allocator_preload_env({**env, "LD_LIBRARY_PATH": str(folder)}) is None


def test_preload_env_without_tcmalloc(monkeypatch, tmp_path):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda env=None: None)
    assert allocator.allocator_preload_env({}) is None  # auto: the C library's malloc, tuned by the train stage
    with pytest.raises(UserError, match=r"KUBETUNE_ALLOCATOR=tcmalloc, but no libtcmalloc_minimal.so.4.*apt-get"):
        allocator.allocator_preload_env({"KUBETUNE_ALLOCATOR": "tcmalloc"})
    with pytest.raises(UserError, match=r"KUBETUNE_ALLOCATOR='jemalloc' is not an allocator choice: use auto"):
        allocator.allocator_preload_env({"KUBETUNE_ALLOCATOR": "jemalloc"})


def test_loaded_allocator_reads_this_process_maps():
    """pytest runs on the C library's malloc (nothing preloaded it), so nothing is found; a real preload is checked
    end to end through the CLI (tests/integration)."""
    import os

    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("tcmalloc", "jemalloc", "mimalloc")):
        pytest.skip("this pytest runs under a preloaded allocator")
    assert allocator.loaded_allocator() is None


@pytest.mark.parametrize(
    ("argv", "restarts"),
    [
        (["train", "-c", "x.yaml"], True),
        (["run", "-c", "x.yaml"], True),
        (["evaluate"], True),
        (["generate", "-p", "hi"], True),
        (["pipeline", "run", "--local", "-c", "x.yaml"], True),
        (["pipeline", "compile"], False),  # no model in this process
        (["prepare", "-c", "x.yaml"], False),
        (["config", "--explain"], False),
        ([], False),
    ],
)
def test_the_cli_restarts_under_tcmalloc_only_for_commands_that_load_a_model(monkeypatch, tmp_path, argv, restarts):
    from kubetune import cli

    folder = _library_dir(tmp_path)
    monkeypatch.setenv("LD_LIBRARY_PATH", str(folder))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(allocator.ALLOCATOR_ENV, raising=False)
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda path, args, env: calls.append((path, args, env)))
    cli._restart_under_allocator(argv)
    if not restarts:
        assert calls == []
        return
    (path, args, env), *more = calls
    assert not more and path == sys.executable and args == sys.orig_argv  # same command line and interpreter flags
    assert env["LD_PRELOAD"] == str(folder / "libtcmalloc_minimal.so.4") and env["LD_LIBRARY_PATH"] == str(folder)


def test_the_cli_carries_on_where_it_cannot_restart(monkeypatch, tmp_path, capsys):
    from kubetune import cli

    monkeypatch.setenv("LD_LIBRARY_PATH", str(_library_dir(tmp_path)))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(allocator.ALLOCATOR_ENV, raising=False)

    def refuse(*_):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.os, "execve", refuse)
    cli._restart_under_allocator(["train"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("kubetune: warning: could not restart under ") and "Permission denied" in err
