"""Scaling out (benchmarks/distributed.py, benchmarks/scaling.py): the projection's arithmetic against hand-checked
cases, the adapter sizes against PEFT's own count, DDP's buckets against torch's, the parsing of the training
summaries, and (slow) smoke runs of the all-reduce microbenchmark and of the training comparison. Timings are never
asserted."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from benchmarks import distributed, scaling

from .runs import ROOT, by_name, read_records, run_module

STORIES = ROOT.parent / "shared" / "data" / "stories260K" / "hf"
TINY = scaling.Arch(
    "tiny", hidden=64, intermediate=172, layers=5, heads=8, kv_heads=4, head_dim=8, vocab=512, tied=True
)


# ------------------------------------------------------------------------------------------------------------------
# the adapter


def test_adapter_size_of_a_hand_counted_layer():
    # q 64->64, k 64->32, v 64->32, o 64->64, gate/up 64->172, down 172->64; r x (in + out) each
    per_layer = 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 3 * (64 + 172))
    assert scaling.adapter_params(TINY, 4, "all-linear") == 5 * per_layer
    assert scaling.adapter_params(TINY, 4, ["q_proj", "v_proj"]) == 5 * 4 * ((64 + 64) + (64 + 32))
    assert scaling.adapter_params(TINY, 4, "q_proj") == 5 * 4 * (64 + 64)
    with pytest.raises(ValueError, match="lm_head"):
        scaling.adapter_params(TINY, 4, ["q_proj", "lm_head"])


@pytest.fixture(scope="module")
def stories_model():
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} is absent (../shared/data is not part of a fresh clone)")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(STORIES)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["down_proj"]])
def test_adapter_size_matches_peft_on_the_tiny_model(stories_model, targets):
    """kubetune's own LoRA config (kubetune.adapters.lora_config, r=16 by default) applied by PEFT: the trainable
    tensors, in model order, are the ones the formula lists, so DDP's buckets are the ones the benchmark sends."""
    import copy

    from peft import get_peft_model

    from kubetune.adapters import lora_config
    from kubetune.config import Config

    cfg = Config().replace(**{"lora.target_modules": targets})
    peft_model = get_peft_model(copy.deepcopy(stories_model), lora_config(cfg))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    arch = scaling.arch_from_config(stories_model.config)
    assert cfg.lora.r == 16 and all(p.dtype.is_floating_point and p.element_size() == 4 for p in trainable)
    assert [p.numel() for p in trainable] == scaling.adapter_tensor_numels(arch, cfg.lora.r, targets)
    assert sum(p.numel() for p in trainable) == scaling.adapter_params(arch, cfg.lora.r, targets)


def test_default_targets_are_kubetunes():
    from kubetune.config import LoraConfig

    assert distributed.default_targets() == (LoraConfig().r, LoraConfig().target_modules)


@pytest.mark.parametrize("name", list(scaling.ARCHITECTURES))
def test_architecture_table_builds_the_models_it_names(name):
    """Each table entry, built as a transformers Llama on the meta device, has the parameter count the table
    derives (and the published sizes: 135M, 1.24B, 8.03B)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    a = scaling.ARCHITECTURES[name]
    config = LlamaConfig(
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        vocab_size=a.vocab,
        tie_word_embeddings=a.tied,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == a.total_params()
    assert scaling.arch_from_config(config, name=a.name, source=a.source) == a
    expected = {"SmolLM2-135M": 134.5e6, "Llama-3.2-1B": 1.236e9, "Llama-3.1-8B": 8.03e9}[name]
    assert a.total_params() == pytest.approx(expected, rel=2e-3)
    assert a.source


def test_smollm2_table_entry_matches_the_converted_model(smollm2_dir):
    from transformers import AutoConfig

    table = scaling.ARCHITECTURES["SmolLM2-135M"]
    got = scaling.arch_from_config(AutoConfig.from_pretrained(smollm2_dir), name=table.name, source=table.source)
    assert got == table


def test_ddp_buckets_match_torchs_assignment():
    import torch
    import torch.distributed as dist

    rng = random.Random(0)
    cases = [
        [n * 4 for n in scaling.adapter_tensor_numels(scaling.ARCHITECTURES["SmolLM2-135M"], 16, "all-linear")],
        [n * 4 for n in scaling.adapter_tensor_numels(TINY, 16, ["q_proj", "v_proj"])],
        [4 * rng.randrange(1, 3_000_000) for _ in range(40)],
    ]
    limits = [dist._DEFAULT_FIRST_BUCKET_BYTES, 25 * 2**20]
    assert limits == [scaling.DDP_FIRST_BUCKET_BYTES, scaling.DDP_BUCKET_CAP_BYTES]
    for sizes in cases:
        tensors = [torch.empty(s // 4, dtype=torch.float32) for s in sizes]
        indices, _ = dist._compute_bucket_assignment_by_size(tensors, limits)
        assert scaling.ddp_buckets(sizes) == [sum(sizes[i] for i in bucket) for bucket in indices]


def test_ddp_default_bucket_cap_is_torchs():
    from torch.nn.parallel import distributed as ddp

    assert ddp._DEFAULT_BUCKET_CAP_MB * 2**20 == scaling.DDP_BUCKET_CAP_BYTES


# ------------------------------------------------------------------------------------------------------------------
# the projection


def test_ring_allreduce_hand_checked():
    assert scaling.ring_allreduce_seconds(1e9, 1, 1e9, 1e-3) == 0.0
    # 2 ranks: each sends/receives 2 x 1/2 of the data (1 s at 1 GB/s) in 2 messages per bucket
    assert scaling.ring_allreduce_seconds(1e9, 2, 1e9, 1e-3, buckets=2) == pytest.approx(1.0 + 4e-3)
    # 4 ranks: 2 x 3/4 of the data, 6 messages per bucket
    assert scaling.ring_allreduce_seconds(1e9, 4, 1e9, 1e-3) == pytest.approx(1.5 + 6e-3)
    with pytest.raises(ValueError):
        scaling.ring_allreduce_seconds(1.0, 0, 1.0, 0.0)


def test_step_time_without_and_with_overlap():
    assert scaling.step_seconds(2.0, 0.5, "none") == 2.5
    assert scaling.step_seconds(2.0, 0.5, "full") == 2.0
    assert scaling.step_seconds(0.2, 0.5, "full") == 0.5
    with pytest.raises(ValueError, match="overlap"):
        scaling.step_seconds(1.0, 1.0, "partial")


def _inputs(**kw) -> scaling.Inputs:
    base = dict(
        arch=TINY, vm_arch=TINY, r=4, vm_tokens_per_second=1000.0, node_speedup=1.0, tokens_per_row=100,
        rows_per_rank_weak=4, global_batch=8, bandwidth_gbps=8.0, alpha_s=1e-3,
    )  # fmt: skip
    return scaling.Inputs(**{**base, **kw})


def test_projection_hand_checked():
    inp = _inputs()
    nbytes = scaling.adapter_params(TINY, 4, "all-linear") * 4  # 5 layers x r 4 x 1156 x 4 bytes = 92,480: one bucket
    assert inp.adapter_bytes() == nbytes == 92_480 and inp.buckets() == [nbytes]
    row = scaling.project(inp, 4)
    comm = 6 * 1e-3 + 1.5 * nbytes / 1e9  # 8 Gbps = 1 GB/s
    assert row["allreduce_ms"] == pytest.approx(comm * 1e3, abs=1e-3)
    # weak: 4 rows x 100 tokens / 1000 tokens/s = 0.4 s per rank, plus the all-reduce
    assert row["weak_compute_s"] == pytest.approx(0.4)
    assert row["weak_eff_none"] == pytest.approx(0.4 / (0.4 + comm), abs=1e-4)
    assert row["weak_eff_full"] == 1.0
    # strong: 8 rows / 4 ranks = 2 rows = 0.2 s per rank against 0.8 s on one node
    assert row["strong_speedup_none"] == pytest.approx(0.8 / (0.2 + comm), abs=1e-3)
    assert row["strong_eff_none"] == pytest.approx(0.8 / (0.2 + comm) / 4, abs=1e-4)
    assert row["rows_per_rank"] == 2 and row["grad_accum_steps"] == 2 and row["data_limit_nodes"] == 8
    one = scaling.project(inp, 1)
    assert one["allreduce_ms"] == 0 and one["weak_eff_none"] == one["strong_eff_none"] == 1.0


def test_node_rate_scales_with_speedup_and_flops():
    small, big = scaling.ARCHITECTURES["SmolLM2-135M"], scaling.ARCHITECTURES["Llama-3.1-8B"]
    inp = _inputs(arch=big, vm_arch=small, r=16, node_speedup=5.5)
    ratio = scaling.flops_per_token(small, scaling.adapter_params(small, 16, "all-linear")) / scaling.flops_per_token(
        big, scaling.adapter_params(big, 16, "all-linear")
    )
    assert inp.node_tokens_per_second() == pytest.approx(1000.0 * 5.5 * ratio)
    assert 1 / 70 < ratio < 1 / 40  # an 8B model costs ~50x the FLOPs per token of a 135M one


@pytest.mark.parametrize("arch", list(scaling.ARCHITECTURES.values()), ids=lambda a: a.name)
def test_efficiency_falls_with_nodes_and_rises_with_bandwidth(arch):
    nodes = [1, 2, 4, 8, 16]
    slow = scaling.projection_table([arch], nodes, global_batch=16, bandwidth_gbps=23.0, alpha_s=1e-4)
    fast = scaling.projection_table([arch], nodes, global_batch=16, bandwidth_gbps=200.0, alpha_s=1e-4)
    for key in ("weak_eff_none", "strong_eff_none", "strong_eff_full"):
        values = [r[key] for r in slow]
        assert all(b <= a for a, b in itertools.pairwise(values)), (key, values)
    speedups = [r["strong_speedup_none"] for r in slow]
    assert all(b > a for a, b in itertools.pairwise(speedups))  # still faster, less efficiently
    for s, f in zip(slow, fast, strict=True):
        assert f["weak_eff_none"] >= s["weak_eff_none"] and f["strong_eff_none"] >= s["strong_eff_none"]
        assert s["strong_eff_full"] >= s["strong_eff_none"] and s["weak_eff_full"] >= s["weak_eff_none"]
        assert s["allreduce_ms"] >= f["allreduce_ms"]


def test_data_per_rank_limits_strong_scaling():
    assert scaling.data_limit_nodes(4) == 4 and scaling.data_limit_nodes(64, micro_batch=2) == 32
    assert scaling.grad_accum_steps(4, 4) == 1 and scaling.grad_accum_steps(64, 4, micro_batch=2) == 8
    rows = {r["nodes"]: r for r in scaling.projection_table([TINY], [2, 4, 8, 16], r=4, global_batch=4)}
    assert rows[4]["grad_accum_steps"] == 1 and rows[4]["strong_eff_none"] is not None
    for n in (8, 16):  # fewer rows than ranks: no strong-scaling figure, and the data is named as the limit
        assert rows[n]["strong_eff_none"] is None and rows[n]["strong_speedup_full"] is None
        assert rows[n]["limited_by"] == f"data: 4 rows < {n} ranks"
        assert rows[n]["weak_eff_none"] is not None  # weak scaling has no such limit
    # a slow link: communication is named before the data runs out
    slow = scaling.project(_inputs(bandwidth_gbps=0.001, global_batch=64), 2)
    assert slow["limited_by"].startswith("communication")
    # an uneven split: the busiest rank's rows count (3 rows on 2 ranks: 2 rows on one of them)
    uneven = scaling.project(_inputs(global_batch=3, alpha_s=0.0, bandwidth_gbps=1e9), 2)
    assert uneven["strong_speedup_none"] == pytest.approx(1.5, abs=1e-3)


def test_c3_machines_cite_their_source():
    for m in scaling.C3_MACHINES.values():
        assert m.source.startswith("https://cloud.google.com/compute/docs/") and m.physical_cores * 2 == m.vcpus
        assert m.tier1_gbps is None or m.tier1_gbps > m.default_gbps
    assert scaling.C3_MACHINES["c3-standard-22"].tier1_gbps is None  # Tier_1 needs at least 30 vCPUs


# ------------------------------------------------------------------------------------------------------------------
# the microbenchmark's and the training comparison's arithmetic


def test_ring_fit_recovers_alpha_and_bandwidth():
    alpha, bw, world = 40e-6, 2.5e9, 2
    points = [(b, 2 * (world - 1) * alpha + 2 * (world - 1) / world * b / bw) for b in (4096, 1 << 20, 16 << 20)]
    got_alpha, got_bw = distributed.fit_alpha_bandwidth(points, world)
    assert got_alpha == pytest.approx(alpha, rel=1e-6) and got_bw == pytest.approx(bw, rel=1e-6)
    with pytest.raises(distributed.BenchError):
        distributed.fit_alpha_bandwidth(points[:2], world)
    # noise on the largest transfer moves the bandwidth a little and leaves the latency alone
    noisy = [*points[:2], (points[2][0], points[2][1] * 1.2), (64 << 20, 2 * (64 << 20) / 2 / bw)]
    n_alpha, n_bw = distributed.fit_alpha_bandwidth(noisy, world)
    assert n_alpha == pytest.approx(alpha, rel=0.05) and 0.7 * bw < n_bw < 1.3 * bw


def test_rounds_take_the_slowest_rank():
    got = distributed.summarise_rounds([[1.0, 5.0, 2.0], [3.0, 1.0, 2.5]])
    assert got == {"median_s": 3.0, "min_s": 2.5, "max_s": 5.0, "rounds": 3}


def test_bus_bandwidth_follows_nccl_tests():
    assert distributed.bandwidths(2_000_000_000, 1.0, 2) == {"algbw_gb_s": 2.0, "busbw_gb_s": 2.0}
    assert distributed.bandwidths(2_000_000_000, 1.0, 4) == {"algbw_gb_s": 2.0, "busbw_gb_s": 3.0}


def test_step_buckets_cover_the_adapter():
    arch = scaling.ARCHITECTURES["Llama-3.1-8B"]
    buckets = distributed.step_buckets(arch, 16, "all-linear")
    assert sum(buckets) == scaling.adapter_params(arch, 16, "all-linear") == 41_943_040
    assert buckets[0] * 4 >= scaling.DDP_FIRST_BUCKET_BYTES and len(buckets) == 8


def _summary(world: int, tps: float, curve, **extra) -> dict:
    return {
        "train_tokens_per_second": tps, "train_seconds": 10.0, "steps_this_run": 4, "tokens_this_run": int(tps * 10),
        "loss_curve": curve, "final_loss": curve[-1][1], "trainable_parameters": 4_884_480,
        **({"world_size": world, "backend": "gloo", "tokens_per_second_per_rank": [tps / world] * world,
            "collective_seconds_per_step": 0.05 if world > 1 else 0.0,
            "allreduce_bytes_per_step": 19_537_920 if world > 1 else 0} if world else {}),
        **extra,
    }  # fmt: skip


def test_training_records_read_the_distributed_summary():
    one = distributed.arm_record("1 process", 1, 2, _summary(1, 200.0, [[1, 3.0], [2, 2.5]]), wall=30.0)
    two = distributed.arm_record("2 ranks", 2, 1, _summary(2, 180.0, [[1, 3.0], [2, 2.5002]]), wall=33.0)
    assert two["world_size"] == 2 and two["backend"] == "gloo" and two["tokens_per_second_per_rank"] == [90.0, 90.0]
    assert two["allreduce_mib_per_step"] == pytest.approx(18.63, abs=0.01) and two["steps"] == 4
    pair = distributed.pair_record(one, two, None)
    assert pair["tokens_per_second_ratio"] == 0.9 and pair["max_loss_difference"] == pytest.approx(2e-4, abs=1e-6)
    assert pair["loss_steps_compared"] == 2
    assert pair["collective_share_of_step"] == pytest.approx(0.05 / (10.0 / 4))
    assert "#3" in distributed.pair_record(one, two, 3)["name"]


def test_fsdp_arms_come_with_the_ddp_arm_they_are_compared_against():
    assert [a[0] for a in distributed.train_arms(["ddp"])] == ["one", "ddp"]
    assert [a[0] for a in distributed.train_arms(["ddp", "fsdp"])] == ["one", "ddp", "ddp-plain", "fsdp"]
    arms = {a[0]: a for a in distributed.train_arms(["ddp", "fsdp"])}
    assert "distributed.strategy=fsdp" in arms["fsdp"][4] and arms["ddp"][4] == []
    # an fsdp run turns the CPU layer rewrites off (kubetune.plan): the plain DDP arm does too
    assert {"cpu.lean_layers=off", "cpu.split_gemms=off"} <= set(arms["ddp-plain"][4])
    assert all(a[2] == 2 and a[3] == 1 for k, a in arms.items() if k != "one")
    pairs = {(one, two) for one, two, _ in distributed.TRAIN_PAIRS}
    assert pairs == {("one", "ddp"), ("ddp-plain", "fsdp"), ("ddp", "fsdp")} and set(arms) >= {
        k for p in pairs for k in p
    }
    fsdp = {"fsdp": {"units": 5, "base_bytes": 4 << 20, "base_bytes_this_rank": 2 << 20}, "strategy": "fsdp"}
    rec = distributed.arm_record("f", 2, 1, _summary(2, 150.0, [[1, 3.0]], **fsdp), wall=1.0)
    assert (rec["strategy"], rec["base_mib_rank_0"], rec["allgather_mib_per_step"]) == ("fsdp", 2.0, None)
    rec = distributed.arm_record("f", 2, 1, _summary(2, 150.0, [[1, 3.0]], allgather_bytes_per_step=3 << 20), 1.0)
    assert rec["allgather_mib_per_step"] == 3.0
    assert distributed.arm_record("d", 2, 1, _summary(2, 150.0, [[1, 3.0]]), wall=1.0)["base_mib_rank_0"] is None


def test_training_part_skips_a_kubetune_without_torchrun_support():
    old = _summary(0, 200.0, [[1, 3.0]])
    msg = distributed.unsupported_message(old, "/venv/bin/kubetune")
    assert msg is not None and "\n" not in msg and "world_size" in msg and "/venv/bin/kubetune" in msg
    assert distributed.unsupported_message(_summary(1, 200.0, [[1, 3.0]]), "k") is None
    rec = distributed.arm_record("old", 1, 2, old, wall=1.0)
    assert rec["world_size"] is None and rec["collective_seconds_per_step"] is None


def test_train_commands_follow_the_torchrun_contract(tmp_path):
    c, p, o = tmp_path / "c.yaml", tmp_path / "packed", tmp_path / "out"
    one = distributed.train_commands(c, p, o, ranks=1, threads=2, kubetune="/v/bin/kubetune")
    assert one == ["/v/bin/kubetune", "train", "--config", str(c), "--packed", str(p), "--out", str(o),
                   "--set", "train.threads=2"]  # fmt: skip
    two = distributed.train_commands(c, p, o, ranks=2, threads=1, kubetune="/v/bin/kubetune", extra=["--set", "x=1"])
    i = two.index("--no-python")
    assert two[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in two[:i]
    assert two[i + 1 :] == ["/v/bin/kubetune", *one[1:-1], "train.threads=1", "--set", "x=1"]


def test_train_config_is_valid_for_kubetune(tmp_path):
    from kubetune import config

    path = distributed.write_train_config(
        tmp_path / "t.yaml", model="m", data="d.jsonl", max_length=128, batch=4, steps=3, seed=1, work=tmp_path
    )
    cfg = config.load(str(path), ["train.threads=1"])
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.threads, cfg.tracking.enabled) == (3, 4, 1, False)
    assert cfg.lora.target_modules == "all-linear" and cfg.lora.r == 16  # kubetune's defaults, as projected


def test_arguments():
    args = distributed.parse_args(["--quick"])
    assert (
        args.repeats == 1 and args.steps <= 2 and args.allreduce_repeats <= 3 and args.parts == list(distributed.PARTS)
    )
    assert distributed.parse_args([]).repeats >= 2  # a shared machine: every measurement at least twice
    with pytest.raises(SystemExit):
        distributed.parse_args(["--parts", "warp"])
    with pytest.raises(SystemExit):
        distributed.parse_args(["--machines", "c3-standard-7"])
    assert distributed.parse_args(["--quick"]).strategies == ["ddp"]
    assert distributed.parse_args([]).strategies == ["ddp", "fsdp"]
    assert distributed.parse_args(["--quick", "--strategies", "ddp,fsdp"]).strategies == ["ddp", "fsdp"]
    for bad in ("fsdp", "ddp,zero3", ""):  # the DDP arm is every ratio's reference
        with pytest.raises(SystemExit):
            distributed.parse_args(["--strategies", bad])


def test_help_runs():
    proc = run_module("distributed", "--help", timeout=120)
    assert proc.returncode == 0 and "--parts" in proc.stdout


# ------------------------------------------------------------------------------------------------------------------
# smoke runs (real processes, small sizes)


@pytest.mark.slow
def test_allreduce_and_projection_quick(tmp_path):
    out = tmp_path / "d.jsonl"
    proc = run_module(
        "distributed", "--quick", "--parts", "allreduce,projection", "--model", "table",
        "--out", str(out), "--quiet-wait", "0", "--workdir", str(tmp_path / "w"), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_records(out)
    runs = [r for r in records if r["bench"] == "allreduce"]
    sweep = [r for r in runs if r["kind"] == "sweep"]
    assert [r["bytes"] for r in sweep] == distributed.QUICK_SWEEP_BYTES
    (adapter,) = [r for r in runs if r["kind"] == "adapter"]
    arch = scaling.ARCHITECTURES["SmolLM2-135M"]
    assert adapter["bytes"] == scaling.adapter_params(arch, 16, "all-linear") * 4 == 19_537_920
    assert adapter["buckets"] == len(adapter["bucket_mib"]) == 2
    for r in runs:
        assert r["world_size"] == 2 and r["backend"] == "gloo" and r["rounds"] == 3
        assert 0 < r["min_ms"] <= r["ms"] <= r["max_ms"]
        assert r["busbw_gb_s"] == pytest.approx(r["bytes"] / (r["ms"] / 1e3) / 1e9, rel=0.02)
    (fit,) = [r for r in records if r["bench"] == "allreduce-fit"]
    assert fit["alpha_us"] >= 0 and fit["bandwidth_gb_s"] > 0
    (inputs,) = [r for r in records if r["bench"] == "projection-inputs"]
    assert inputs["alpha_us"] == fit["alpha_us"] and "fit" in inputs["alpha_source"]
    proj = [r for r in records if r["bench"] == "projection"]
    # 2 machines (c3-standard-22: default only; -176: default and Tier_1) x 2 global batches x 3 models x 5 node counts
    assert len(proj) == 3 * 2 * 3 * 5
    assert {r["model"] for r in proj} == set(scaling.ARCHITECTURES) and all(
        math.isfinite(r["allreduce_ms"]) for r in proj
    )
    assert "### Projected scaling on C3 nodes" in proc.stdout and "### Ring fit" in proc.stdout


@pytest.mark.slow
def test_training_comparison_runs(tmp_path, tiny_model_dir):
    """On the tiny model both arms train and the records carry the figures of this kubetune's train stage under
    torchrun (the skip for a kubetune without it is test_training_part_skips_a_kubetune_without_torchrun_support)."""
    rows = [{"instruction": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}. " * 3} for i in range(32)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "t.jsonl"
    proc = run_module(
        "distributed", "--parts", "train", "--train-model", str(tiny_model_dir), "--data", str(data),
        "--max-length", "64", "--batch", "2", "--steps", "2", "--repeats", "1", "--quiet-wait", "0",
        "--out", str(out), "--workdir", str(tmp_path / "w"), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = by_name(read_records(out), "dist-train")
    assert "skipped" not in records, records.get("skipped")
    one, two = records["1 process x 2 threads"], records["2 ranks x 1 thread (torchrun)"]
    assert (one["world_size"], two["world_size"]) == (1, 2) and two["backend"] == "gloo"
    assert one["steps"] == two["steps"] == 2 and len(two["tokens_per_second_per_rank"]) == 2
    assert two["allreduce_bytes_per_step"] > 0 and two["collective_seconds_per_step"] > 0
    assert one["trainable_parameters"] == two["trainable_parameters"]
    pairs = by_name(read_records(out), "dist-train-ratio")
    assert pairs["2 ranks x 1 thread / 1 process x 2 threads"]["tokens_per_second_ratio"] == pytest.approx(
        two["tokens_per_second"] / one["tokens_per_second"], rel=0.01
    )
    # the fsdp arm sharded the base over both ranks; the DDP arm it is set against ran the same arithmetic
    fsdp, plain = records["2 ranks x 1 thread, fsdp"], records["2 ranks x 1 thread, ddp, CPU rewrites off"]
    assert (fsdp["strategy"], plain["strategy"], two["strategy"]) == ("fsdp", "ddp", "ddp")
    assert fsdp["base_mib_rank_0"] > 0 and plain["base_mib_rank_0"] is None
    assert fsdp["allgather_mib_per_step"] > 0 and plain["allgather_mib_per_step"] is None
    assert max(abs(a[1] - b[1]) for a, b in zip(fsdp["loss_curve"], plain["loss_curve"], strict=True)) < 1e-5
    ratio = pairs["fsdp / ddp, both with the CPU rewrites off"]["tokens_per_second_ratio"]
    assert ratio == pytest.approx(fsdp["tokens_per_second"] / plain["tokens_per_second"], rel=0.01)
    assert "fsdp / ddp as each runs by default" in pairs
