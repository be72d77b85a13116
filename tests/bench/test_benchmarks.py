"""The benchmark scripts' plumbing (benchmarks/): records, counting, accounting, parsing. Timings are never asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common, data_stages, gpu_qlora, memory, pipeline_overhead, train_throughput
from kubetune.cpu import allocator

from .runs import ROOT, by_name, read_records, run_module

# ------------------------------------------------------------------------------------------------------------------
# training throughput, end to end on the tiny model: both arms, one lever


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("bench-train")
    rows = [{"instruction": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}. " * 3} for i in range(48)]
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "results.jsonl"
    proc = run_module(
        "train_throughput",
        *("--model", str(tiny_model_dir), "--data", str(data), "--max-length", "64", "--batch", "2"),
        *("--warmup", "1", "--steps", "2", "--eval-rows", "4", "--levers", "lora.dropout=0,baseline + tcmalloc"),
        *("--lever-steps", "1"),
        *(
            "--out",
            str(out),
            "--workdir",
            str(tmp / "work"),
            "--keep",
            "--timeout",
            "300",
            "--quiet-wait",
            "0",
            "--retries",
            "0",
        ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, read_records(out), tmp / "work"


def test_train_benchmark_emits_one_sane_record_per_arm(train_run):
    proc, records, _ = train_run
    assert records[0]["bench"] == "environment" and records[0]["versions"]["trl"]
    assert all(len(r["load_avg"]) == 3 for r in records)
    peaks = [r for r in records if r["bench"] == "peak" and "fp32_gflops" in r]
    assert len(peaks) == 2 and all(p["fp32_gflops"] > 0 and p["bf16_gflops"] > 0 for p in peaks)
    shape_peaks = [r for r in records if r["bench"] == "peak" and "shape_fp32_gflops" in r]
    assert len(shape_peaks) == 2 and all(p["shape_bf16_gflops"] > 0 for p in shape_peaks)
    arms = by_name(records, "train")
    assert set(arms) == {"baseline", "kubetune"}
    base, kt = arms["baseline"], arms["kubetune"]
    # TRL's defaults on the baseline; kubetune's automatic choices on the other arm
    assert base["precision"] == "bf16" and base["activation_checkpointing"] is True
    assert kt["activation_checkpointing"] is False and kt["settings"]["precision"]["value"] == kt["precision"]
    for r in (base, kt):
        assert r["counted_steps"] == 2 and r["warmup_steps"] == 1
        assert 0 < r["tokens"] <= 2 * 2 * 64  # two counted steps of at most 2 rows x 64 tokens
        assert 0 < r["loss_token_fraction"] <= 1
        assert r["tokens_per_second"] == pytest.approx(r["tokens"] / r["seconds"], rel=0.01)
        assert r["s_per_step"] == pytest.approx(r["seconds"] / 2, rel=0.01)
        assert r["peak_rss_bytes"] > 100 * 2**20
        assert 0 < r["train_peak_rss_gib"] <= r["peak_rss_gib"] + 0.01
        assert r["train_peak_rss_gib"] <= r["run_peak_rss_gib"]  # the run's peak covers loading and training
        assert r["peak_gflops"] == max(p[f"{r['precision']}_gflops"] for p in peaks)
        assert r["shape_peak_gflops"] == max(p[f"shape_{r['precision']}_gflops"] for p in shape_peaks)
        assert r["tokens_per_second_median_step"] > 0
        # CPU seconds of the whole process (its sampler thread and data loader too) over the counted window: a fixed
        # 0.1 CPU-s of slack, which matters only for windows as short as this tiny run's
        assert 0 < r["cpu_util"] <= 1.05 + 0.1 / (r["seconds"] * r["threads"])
        assert 0 < r["train_peak_anon_gib"] <= r["train_peak_rss_gib"] + 0.01
        assert r["mfu"] == pytest.approx(
            r["flops_per_token"] * r["tokens_per_second"] / (r["peak_gflops"] * 1e9), abs=1e-3
        )
        assert math.isfinite(r["eval_loss"]) and r["eval_tokens"] > 0
        assert isinstance(r["page_faults_per_step"], int) and r["page_faults_per_step"] >= 0
    # the same base model scored on the same held-out tokens in fp32 by both arms
    assert base["eval_tokens"] == kt["eval_tokens"]
    assert base["base_eval_loss"] == pytest.approx(kt["base_eval_loss"], rel=1e-4)
    ratio = by_name(records, "train-ratio")["kubetune / baseline"]
    assert ratio["tokens_per_second_ratio"] == pytest.approx(
        kt["tokens_per_second"] / base["tokens_per_second"], rel=0.02
    )
    lever = by_name(records, "train-lever")["lora.dropout=0"]
    assert lever["reference"] == "kubetune" and lever["counted_steps"] == 1 and lever["vs_reference"] > 0
    # the recipe runs on the C library's malloc, as a user's script; kubetune as the `kubetune` command starts it
    # (the baseline worker inherits this test's environment, which preloads nothing)
    assert not os.environ.get("LD_PRELOAD"), "run the benchmark tests without LD_PRELOAD"
    tcmalloc = allocator.find_tcmalloc()
    assert base["malloc"] == "libc"
    assert kt["malloc"] == (Path(os.path.realpath(tcmalloc)).name if tcmalloc else "libc")
    on_tcmalloc = by_name(records, "train-lever")["baseline + tcmalloc"]
    if tcmalloc:  # the recipe preloaded with it, measured against the recipe and against kubetune
        assert on_tcmalloc["malloc"] == kt["malloc"] and on_tcmalloc["reference"] == "baseline"
        assert on_tcmalloc["vs_reference"] > 0 and on_tcmalloc["kubetune_vs_this"] > 0
    else:  # nothing to preload: the lever says so instead of measuring the same run twice
        assert on_tcmalloc["error"] == "no tcmalloc installed to preload"
    assert "| baseline" in proc.stdout and "### Levers" in proc.stdout


def test_train_benchmark_flops_accounting_matches_the_model(train_run, tiny_model_dir):
    _, records, _ = train_run
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    h, i, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    body = layers * (h * h * 2 + h * kv * 2 + 3 * h * i)  # q, o; k, v; gate, up, down
    lora = layers * 16 * ((h + h) + (h + kv))  # r=16 on q_proj (h->h) and v_proj (h->kv)
    kt = by_name(records, "train")["kubetune"]
    expected = 4 * body + 6 * lora + 4 * v * h * kt["loss_token_fraction"]
    assert kt["flops_per_token"] == pytest.approx(expected, rel=1e-3)
    assert kt["flops_per_token_4n"] == 4 * (body + v * h)


# ------------------------------------------------------------------------------------------------------------------
# pieces, without subprocesses


def test_summarise_counts_only_batches_of_counted_steps():
    raw = {
        "step_end": [2.0, 3.0, 4.5],
        "step_cpu": [3.0, 5.0, 8.0],
        "step_faults": [100, 250, 700],
        "batch_tokens": [100, 200, 300, 999],  # the 4th batch was prefetched and never trained on
        "batch_loss_tokens": [50, 100, 150, 999],
        "batch_attn_pairs": [],
        "loss_curve": [[3, 1.5]],
        "precision": "fp32",
        "threads": 2,
        "shape": {"body_linear_params": 1000, "lm_head_params": 500, "lora_params": 10, "layers": 2, "attn_width": 8},
    }
    res = common.WorkerResult(raw, peak_rss_bytes=2**30, cpu_seconds=1.0, wall_seconds=9.0, log=Path("x.log"))
    r = train_throughput.apply_peaks(train_throughput.summarise("x", "kubetune", res, warmup=1), {"fp32": 10.0})
    assert r["tokens"] == 500 and r["seconds"] == 2.5 and r["tokens_per_second"] == 200.0
    assert r["s_per_step"] == 1.25 and r["warmup_seconds"] == 2.0
    assert r["cpu_util"] == pytest.approx((8.0 - 3.0) / 2.5 / 2)
    assert r["loss_token_fraction"] == 0.5
    assert r["flops_per_token"] == 4 * 1000 + 6 * 10 + 4 * 500 * 0.5
    assert r["mfu"] == pytest.approx(r["flops_per_token"] * 200 / 10e9, abs=1e-3)
    assert r["tokens_per_cpu_second"] == pytest.approx(500 / 5.0)
    assert r["page_faults_per_step"] == (700 - 100) / 2  # over the two counted steps only


def test_mfu_uses_the_best_peak_measured_in_the_invocation():
    peaks = train_throughput.best_peaks(
        [
            {"bench": "peak", "fp32_gflops": 90.0, "bf16_gflops": 400.0},
            {"bench": "train", "tokens_per_second": 1.0},
            {"bench": "peak", "fp32_gflops": 120.0, "bf16_gflops": 350.0},
        ]
    )
    assert peaks == {"fp32": 120.0, "bf16": 400.0}


def test_summarise_sums_the_micro_batches_of_each_optimizer_step():
    raw = {
        "step_end": [1.0, 2.0, 4.0],
        "step_cpu": [2.0, 4.0, 8.0],
        "batch_tokens": [10, 20, 30, 40, 50, 60, 70, 80],  # 2 micro-batches per step; the 7th and 8th prefetched
        "batch_loss_tokens": [5, 10, 15, 20, 25, 30, 35, 40],
        "batch_attn_pairs": [],
        "grad_accum": 2,
        "precision": "fp32",
        "threads": 2,
        "shape": {"body_linear_params": 1, "lm_head_params": 1, "lora_params": 1, "layers": 1, "attn_width": 1},
    }
    res = common.WorkerResult(raw, peak_rss_bytes=1, cpu_seconds=1.0, wall_seconds=1.0, log=Path("x.log"))
    r = train_throughput.summarise("x", "kubetune", res, warmup=1)
    assert r["tokens"] == 30 + 40 + 50 + 60 and r["seconds"] == 3.0 and r["grad_accum"] == 2
    # step 2 trained 70 tokens in 1 s, step 3 110 tokens in 2 s
    assert r["tokens_per_second_median_step"] == pytest.approx((70 + 55) / 2)


def test_minor_faults_count_the_pages_a_process_maps_in():
    import mmap

    before = train_throughput._minor_faults()
    with mmap.mmap(-1, 64 << 20) as region:  # fresh anonymous memory: every page (or huge page) faults on first write
        for offset in range(0, 64 << 20, 4096):
            region[offset] = 1
    # 16384 small pages, or 32 huge ones where the kernel backs the region with transparent huge pages
    assert train_throughput._minor_faults() - before >= 32


def test_summarise_refuses_runs_without_counted_steps():
    raw = {"step_end": [1.0], "step_cpu": [1.0], "batch_tokens": [1], "batch_loss_tokens": [1], "shape": {}}
    res = common.WorkerResult(raw, 1, 1.0, 1.0, Path("x.log"))
    with pytest.raises(common.BenchError, match="warm-up"):
        train_throughput.summarise("x", "kubetune", res, warmup=1)


def test_counting_collator_excludes_padding_and_counts_loss_tokens():
    from kubetune.sft import PackedRowsCollator

    probe = train_throughput.Probe()
    collate = train_throughput.CountingCollator(PackedRowsCollator(pad_token_id=0), probe)
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "seq_lengths": [3, 2]},
        {"input_ids": [5, 6], "labels": [-100, 6], "seq_lengths": [2]},
    ]
    collate(rows)
    assert probe.batch_tokens == [7]  # 5 + 2 real tokens; the 3 padding tokens of row 2 are not counted
    # shifted labels that carry loss: row 1 -> 6, 7, 9 (the collator masks each example's first token), row 2 -> 6
    assert probe.batch_loss_tokens == [4]
    # causal pairs: examples of 3 and 2 tokens, then 2 tokens + a 3-token padding block
    assert probe.batch_attn_pairs == [6 + 3 + 3 + 6]


def test_causal_pairs_follow_position_id_restarts():
    import torch

    assert train_throughput._causal_pairs(torch.tensor([[0, 1, 2, 0, 1]])) == 6 + 3
    assert train_throughput._causal_pairs(torch.tensor([[0, 1], [0, 1]])) == 3 + 3


def test_lever_names_are_validated():
    assert train_throughput._lever_names("none") == []
    assert "compile=true" in train_throughput._lever_names("default")
    assert train_throughput._lever_names("threads=1,lora.dropout=0") == ["threads=1", "lora.dropout=0"]
    with pytest.raises(SystemExit, match="unknown"):
        train_throughput._lever_names("warp-drive")


def test_quick_mode_shrinks_the_training_run():
    args = train_throughput.parse_args(["--quick"])
    assert (args.warmup, args.steps, args.levers) == (1, 2, "none") and args.max_length <= 256
    assert train_throughput.parse_args([]).steps >= 4


def test_replicated_rows_stay_distinct(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"q{i}", "response": "a"}) + "\n" for i in range(5)))
    dest = tmp_path / "x4.jsonl"
    assert data_stages.replicate(src, dest, 4) == 20
    rows = [json.loads(line) for line in dest.read_text().splitlines()]
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == 20
    assert rows[0] == {"instruction": "q0", "response": "a"} and rows[5]["instruction"] == "q0 (copy 1)"


def test_replicate_refuses_rows_without_an_instruction(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps({"messages": []}) + "\n")
    with pytest.raises(common.BenchError, match="instruction"):
        data_stages.replicate(src, tmp_path / "out.jsonl", 2)


def test_task_walls_parse_kfp_local_log_lines():
    from datetime import datetime

    log = (
        "23:59:58.500 - INFO - Executing task \x1b[96m'prepare'\x1b[0m\n"
        "noise\n"
        "23:59:59.750 - INFO - Task \x1b[96m'prepare'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m\n"
        "23:59:59.800 - INFO - Executing task 'pack'\n"
        "00:00:01.300 - INFO - Task 'pack' finished with status SUCCESS\n"
    )
    walls = pipeline_overhead.task_walls(log, datetime(2026, 1, 1))
    assert walls == {"prepare": pytest.approx(1.25), "pack": pytest.approx(1.5)}


def test_stage_timer_hook_times_wrapped_library_calls(tmp_path):
    times = tmp_path / "times.jsonl"
    code = (
        "import kubetune.pack as p, components.runtime as r\n"
        "assert p.pack._bench_timed and r.decide._bench_timed\n"
        "try:\n    r.decide(None, '/nonexistent', force=False, accelerator='cpu')\nexcept Exception:\n    pass\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": f"{pipeline_overhead.TIMER_DIR}{os.pathsep}{ROOT}",
        "KUBETUNE_BENCH_STAGE_TIMES": str(times),
    }
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (line,) = read_records(times)
    assert line["stage"] == "components.runtime.decide" and line["seconds"] >= 0
    # without the variable the hook does nothing
    env.pop("KUBETUNE_BENCH_STAGE_TIMES")
    proc = subprocess.run(
        [sys.executable, "-c", "import kubetune.pack as p; print(hasattr(p.pack, '_bench_timed'))"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.stdout.strip() == "False"


def test_weight_bytes_counts_parameters_buffers_and_quant_state(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    params = sum(p.numel() * 2 for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert memory.weight_bytes(model) == params + buffers

    class State:
        absmax = torch.zeros(10, dtype=torch.uint8)
        code = torch.zeros(4, dtype=torch.float32)
        offset = None
        state2 = type("S2", (), {"absmax": torch.zeros(2, dtype=torch.float32), "code": None, "state2": None})()

    assert memory._quant_state_bytes(State()) == 10 + 16 + 8


def test_gpu_script_refuses_to_run_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run_module("gpu_qlora", timeout=120)
    assert proc.returncode == 2 and "needs a GPU" in proc.stderr


def test_gpu_script_model_is_llama_8b_shaped_and_its_inputs_are_reproducible():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    args = gpu_qlora.parse_args([])
    assert (args.size, args.max_length, args.target_modules) == ("8b", 2048, "all-linear")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**gpu_qlora.SIZES["8b"]))
    assert 7.9e9 < sum(p.numel() for p in model.parameters()) < 8.1e9
    rows = gpu_qlora.synthetic_rows(20, seed=0, max_words=60)
    assert rows == gpu_qlora.synthetic_rows(20, seed=0, max_words=60) and len({r["instruction"] for r in rows}) == 20
    tok = gpu_qlora.build_tokenizer(rows, 300)
    text = tok.apply_chat_template([{"role": "user", "content": rows[0]["instruction"]}], tokenize=False)
    assert text.startswith("<|im_start|>user\n") and tok.pad_token_id is not None


def test_gemm_gflops_counts_the_flops_of_every_round(monkeypatch):
    import itertools
    import time

    clock = itertools.count()  # each reading of the clock is one second later
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    # t0 = 0; at 1 s one round of both matmuls runs; at 2 s the 1.5 s window is over; the rate is read at 3 s
    got = common.gemm_gflops([(2, 3, 4), (5, 6, 7)], "fp32", 1, seconds=1.5, repeats=1)
    assert got == pytest.approx(2 * (2 * 3 * 4 + 5 * 6 * 7) / 3 / 1e9, rel=1e-3)  # 4 significant digits
