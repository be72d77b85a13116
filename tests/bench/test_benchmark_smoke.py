"""The benchmark sections other than training throughput, each run at smoke size as its own processes (slow):
the records they write have every field and arm, and the figures agree with each other. Timings are never asserted."""

from __future__ import annotations

import math

import pytest

from benchmarks import memory
from kubetune.cpu import allocator

from .runs import by_name, read_records, run_module


@pytest.mark.slow
def test_memory_benchmark_quick(tmp_path):
    out = tmp_path / "m.jsonl"
    proc = run_module("memory", "--quick", "--out", str(out), "--workdir", str(tmp_path / "w"), "--quiet-wait", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    arms = by_name(read_records(out), "memory")
    assert set(arms) == set(memory.ARMS)
    lora, qlora = arms["lora-bf16"], arms["qlora-bf16-rest"]
    assert qlora["weight_bytes"] < lora["weight_bytes"]  # 4-bit linears
    assert all(r["peak_rss_bytes"] > 0 and r["train_peak_rss_gib"] > 0 for r in arms.values())
    ratios = by_name(read_records(out), "memory-ratio")
    assert {"qlora / lora-bf16", "qlora +malloc / lora-bf16 +malloc"} <= set(ratios)
    assert arms["qlora +malloc"]["env"] == "MALLOC_MMAP_THRESHOLD_=65536"
    # the arms allocate as the train stage does (under tcmalloc where it is installed), except those that say otherwise
    tcmalloc = allocator.find_tcmalloc() is not None
    assert arms["qlora"]["env"] == ("tcmalloc (as kubetune starts)" if tcmalloc else None)
    assert arms["qlora +malloc"]["allocator"] == "environment"
    assert arms["qlora (glibc default)"]["allocator"] == "default"
    glibc = ("mmap threshold 8 MiB", "default")  # "default" without glibc's mallopt
    assert arms["qlora (glibc malloc)"]["allocator"] in glibc and arms["qlora (glibc malloc)"]["env"] is None
    assert arms["qlora"]["allocator"] == "tcmalloc" if tcmalloc else arms["qlora"]["allocator"] in glibc
    # set up as the train stage: the 4-bit layers through kubetune.cpu.layers, except in the arm that measures without
    assert arms["qlora"]["lean_layers"]["linear4bit"] == 7 * 4  # 7 projections x 4 layers (--quick)
    assert arms["qlora (bitsandbytes 4-bit layers)"]["lean_layers"]["linear4bit"] == 0
    assert arms["lora-bf16"]["lean_layers"] == {"norms": 9, "mlps": 4, "linear4bit": 0}


@pytest.mark.slow
def test_data_benchmark_small(tmp_path, lima_path):
    rows = tmp_path / "lima-200.jsonl"
    rows.write_text("".join(lima_path.read_text().splitlines(keepends=True)[:200]))
    out = tmp_path / "d.jsonl"
    proc = run_module(
        "data_stages",
        "--data",
        str(rows),
        "--sizes",
        "1,2",
        "--num-proc",
        "1,2",
        "--out",
        str(out),
        "--quiet-wait",
        "0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_records(out)
    data = by_name(records, "data")
    assert data["prepare x2"]["rows"] == 400 and data["prepare x2"]["rows_kept"] == 400
    assert data["pack x2 num_proc=2"]["num_proc"] == 2
    assert data["pack x2 num_proc=1"]["tokens"] == data["pack x2 num_proc=2"]["tokens"]
    assert data["pack x2 num_proc=1"]["tokens"] == pytest.approx(2 * data["pack x1 num_proc=1"]["tokens"], rel=0.01)
    assert "pack x2 / x1 num_proc=1" in by_name(records, "data-scaling")


@pytest.mark.slow
def test_pipeline_overhead_benchmark_quick(tmp_path, stories_dir):
    out = tmp_path / "p.jsonl"
    proc = run_module(
        "pipeline_overhead", "--quick", "--model", str(stories_dir), "--out", str(out), "--quiet-wait", "0"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [r for r in read_records(out) if r["bench"] == "pipeline"]
    assert {"prepare", "check-unchanged", "pack", "train-cpu", "evaluate", "register"} <= set(run["per_task"])
    assert 0 < run["stage_seconds"] < run["wall_seconds"]
    assert run["overhead_seconds"] == pytest.approx(run["wall_seconds"] - run["stage_seconds"], abs=0.2)
    for task in run["per_task"].values():
        assert 0 < task["stage"] <= task["wall"]


@pytest.mark.slow
def test_gpu_script_tiny_path_runs_qlora_on_a_cpu(tmp_path):
    out = tmp_path / "g.jsonl"
    proc = run_module(
        "gpu_qlora",
        *("--size", "tiny", "--allow-cpu", "--quick", "--rows", "48", "--max-length", "96"),
        *("--out", str(out), "--quiet-wait", "0"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_records(out)
    (model,) = [r for r in records if r["bench"] == "gpu-model"]
    assert model["parameters"] > 0
    arms = by_name(records, "train")
    assert set(arms) == {"baseline", "kubetune"}
    assert all(r["method"] == "qlora" and r["tokens"] > 0 and math.isfinite(r["eval_loss"]) for r in arms.values())
