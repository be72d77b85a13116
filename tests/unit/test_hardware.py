"""Hardware-aware choices, with faked CPU flags."""

from __future__ import annotations

from kubetune import hardware
from kubetune.hardware import Hardware


def test_amx_cpu_chooses_bf16():
    hw = hardware.detect(cpu_flags={"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, use_cuda=False)
    d = hardware.choose_precision(hw)
    assert d.value == "bf16" and "AMX" in d.reason


def test_cpu_without_amx_chooses_fp32():
    hw = hardware.detect(cpu_flags={"avx512f", "avx512_bf16"}, use_cuda=False)
    assert hardware.choose_precision(hw).value == "fp32"


def test_cpu_flags_env_override(monkeypatch):
    monkeypatch.setenv("KUBETUNE_CPU_FLAGS", "amx_bf16 avx512f")
    assert hardware.detect(use_cuda=False).amx


def test_cuda_precision():
    assert hardware.choose_precision(Hardware("cuda", cuda_name="L4", cuda_bf16=True)).value == "bf16"
    assert hardware.choose_precision(Hardware("cuda", cuda_name="T4", cuda_bf16=False)).value == "fp16"


def test_explicit_settings_win():
    hw = Hardware("cpu", frozenset({"amx_bf16"}), cores=4)
    assert hardware.choose_precision(hw, "fp32").value == "fp32"
    assert hardware.choose_threads(hw, 3).value == 3
    assert hardware.choose_threads(hw).value == 4


def test_usable_cores_respects_affinity():
    import os

    assert 1 <= hardware.usable_cores() <= len(os.sched_getaffinity(0))


def test_activation_checkpointing_only_when_needed():
    hw = Hardware("cuda", cuda_name="x", cuda_bf16=True, cuda_memory_bytes=16 << 30)
    small = hardware.choose_activation_checkpointing(hw, "auto", activation_bytes=1 << 30, weight_bytes=1 << 30)
    big = hardware.choose_activation_checkpointing(hw, "auto", activation_bytes=20 << 30, weight_bytes=1 << 30)
    assert small.value is False and big.value is True and "exceeds" in big.reason
    assert hardware.choose_activation_checkpointing(hw, "on", activation_bytes=0, weight_bytes=0).value is True
