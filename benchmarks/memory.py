"""Memory: LoRA on a bf16 base against QLoRA (4-bit NF4, double quantisation) on a ~1B-parameter Llama.

    python -m benchmarks.memory [--quick] [--steps 2] [--seq 256] [--out FILE]

The model is built from a ``LlamaConfig`` (hidden 2048, 16 layers, intermediate 8192, 32 heads / 8 KV heads,
vocab 32000, untied head: 1.1B parameters) with random weights, saved once as safetensors in bf16 in the scratch
folder, and loaded by each arm through :func:`kubetune.models.load_model`, as the train stage loads it:

- ``lora-bf16``: the base in bf16;
- ``qlora``: NF4 + double quantisation, bf16 compute, the rest of the model in the dtype the train stage loads it
  in on this machine (fp32 on a CPU), then ``prepare_model_for_kbit_training`` as the train stage calls it;
- ``qlora-bf16-rest``: the non-quantised parts (embeddings, LM head, norms) loaded in bf16 and
  left there (``prepare_model_for_kbit_training`` is skipped: it casts them all to fp32);
- ``lora-bf16 +malloc``, ``qlora +malloc``: the first two with ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment
  (glibc then serves large tensors from mmap and returns them to the kernel when freed).

Each arm is its own subprocess: it loads the model, wraps it with the same LoRA (r 16 on q/k/v/o and the MLP) and
runs ``--steps`` AdamW training steps on ``--batch x --seq`` random tokens. Measured: weight bytes (parameters and
buffers plus bitsandbytes' quantisation state), the process's peak RSS over its whole life (``wait4``), the peak
while loading, and the peak during the training steps alone (VmHWM reset after loading); and, sampled every 20 ms,
the peak of the anonymous part of RSS (heap and tensors) apart from the mapped-file part (weights that
``safetensors`` maps from disk count in RSS while mapped, but they are page cache the kernel can reclaim).
"""

from __future__ import annotations

import argparse
import shutil
import time
from typing import Any

from benchmarks import common
from benchmarks.common import BenchError, Recorder, progress

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ==============================================================================================================
# Worker side


def weight_bytes(model) -> int:
    """Bytes held by parameters and buffers, plus the quantisation state bitsandbytes keeps beside 4-bit weights."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
            qs = getattr(t, "quant_state", None)
            if qs is not None:
                total += _quant_state_bytes(qs)
    return total


def _quant_state_bytes(qs) -> int:
    import torch

    total = 0
    for name in ("absmax", "code", "offset"):
        t = getattr(qs, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(qs, "state2", None)
    return total + (_quant_state_bytes(nested) if nested is not None else 0)


def _make_model(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**spec["config"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(spec["model_dir"])
    return {"parameters": params}


def _train(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from kubetune import models
    from kubetune.config import ModelConfig, QuantConfig

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    rss_imports = common.vm_hwm_bytes()
    whole = common.RssSampler().start()
    model_cfg = ModelConfig(name_or_path=spec["model_dir"])
    t0 = time.perf_counter()
    if spec["method"] == "lora":
        model = models.load_model(model_cfg, dtype="bf16")
    else:
        model = models.load_model(model_cfg, dtype=spec["rest_dtype"], quant=QuantConfig(bits=4, double_quant=True))
    load_seconds = time.perf_counter() - t0
    loaded_bytes = weight_bytes(model)
    load_hwm = common.vm_hwm_bytes()
    if spec["method"] == "qlora" and spec.get("kbit_prepare", True):
        from peft import prepare_model_for_kbit_training

        # As the train stage calls it; note that it casts every non-quantised parameter to fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    train_bytes = weight_bytes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    hwm_reset = common.reset_vm_hwm()
    during = common.RssSampler().start()
    optim = torch.optim.AdamW(trainable, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    step_seconds = []
    losses = []
    for _ in range(spec["steps"]):
        ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]), generator=gen)
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - t)
        losses.append(float(loss))
    train_parts = during.stop()
    whole_parts = whole.stop()
    return {
        "peak_anon_bytes": whole_parts["peak_anon_bytes"],
        "peak_file_bytes": whole_parts["peak_file_bytes"],
        "train_peak_anon_bytes": train_parts["peak_anon_bytes"],
        "train_peak_file_bytes": train_parts["peak_file_bytes"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "weight_bytes": loaded_bytes,
        "weight_bytes_training": train_bytes,
        "rss_after_imports_bytes": rss_imports,
        "load_peak_rss_bytes": load_hwm,
        "train_peak_rss_bytes": common.vm_hwm_bytes() if hwm_reset else None,
        "load_seconds": round(load_seconds, 1),
        "step_seconds": [round(s, 2) for s in step_seconds],
        "losses": losses,
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    return _make_model(spec) if spec["kind"] == "make-model" else _train(spec)


# ==============================================================================================================
# Parent side

# glibc's malloc raises its mmap threshold after large frees, so later large tensors come from heaps it rarely
# returns to the kernel; a fixed threshold keeps them on mmap (freed at once). The "+malloc" arms measure that.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
ARMS: dict[str, dict[str, Any]] = {
    "lora-bf16": {"method": "lora", "rest_dtype": "bf16"},
    # rest_dtype None: the dtype the train stage loads the non-quantised parts in on this machine
    "qlora": {"method": "qlora", "rest_dtype": None, "reference": "lora-bf16"},
    "qlora-bf16-rest": {"method": "qlora", "rest_dtype": "bf16", "kbit_prepare": False, "reference": "lora-bf16"},
    "lora-bf16 +malloc": {"method": "lora", "rest_dtype": "bf16", "env": MALLOC_ENV},
    "qlora +malloc": {"method": "qlora", "rest_dtype": None, "env": MALLOC_ENV, "reference": "lora-bf16 +malloc"},
}


def _stage_rest_dtype() -> str:
    """The dtype kubetune's train stage loads a QLoRA model's non-quantised parts in on this machine."""
    from kubetune import hardware

    hw = hardware.detect()
    precision = hardware.choose_precision(hw).value
    return "fp32" if hw.device == "cpu" else precision


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    common.common_args(p)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of: {', '.join(ARMS)}")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads = 512, 4, 2048, 8, 2
        args.steps, args.seq = 1, 64
    return args


def run(args: argparse.Namespace, rec: Recorder) -> list[dict[str, Any]]:
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise BenchError(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        arms = [a for a in arms if ARMS[a]["method"] == "lora"]
        progress("memory: bitsandbytes is not installed; QLoRA arms skipped")
    work = common.make_workdir(args.workdir, "memory")
    threads = common.threads_of(args.threads)
    model_dir = work / "llama-random"
    config = {
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "intermediate_size": args.intermediate,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }
    records: list[dict[str, Any]] = []
    try:
        progress(f"memory: building a random Llama ({args.layers} layers, hidden {args.hidden}) in {model_dir}")
        made = common.run_worker(
            "memory",
            {"kind": "make-model", "config": config, "model_dir": str(model_dir)},
            workdir=work,
            name="make-model",
            timeout_s=args.timeout,
            verbose=args.verbose,
        ).result
        by_arm: dict[str, dict[str, Any]] = {}
        for arm in arms:
            opts = dict(ARMS[arm])
            opts["rest_dtype"] = opts["rest_dtype"] or _stage_rest_dtype()
            env = opts.pop("env", {})
            opts.pop("reference", None)
            spec = {
                "kind": "train",
                "model_dir": str(model_dir),
                "steps": args.steps,
                "batch": args.batch,
                "seq": args.seq,
                "threads": threads,
                **opts,
            }
            progress(f"memory: {arm} ({args.steps} steps of {args.batch} x {args.seq} tokens)")
            res = common.run_worker(
                "memory", spec, workdir=work, name=_slug(arm), timeout_s=args.timeout, verbose=args.verbose, env=env
            )
            r = res.result
            record = {
                "bench": "memory",
                "name": arm,
                "method": opts["method"],
                "non_quantised_dtype": opts["rest_dtype"],
                "kbit_prepare": opts.get("kbit_prepare", True) if opts["method"] == "qlora" else None,
                "env": " ".join(f"{k}={v}" for k, v in env.items()) or None,
                "parameters": made["parameters"],
                "trainable_parameters": r["trainable_parameters"],
                "weight_bytes": r["weight_bytes"],
                "weight_gib": common.gib(r["weight_bytes"]),
                "weight_gib_training": common.gib(r["weight_bytes_training"]),
                "peak_rss_bytes": res.peak_rss_bytes,
                "peak_rss_gib": common.gib(res.peak_rss_bytes),
                "load_peak_rss_gib": common.gib(r["load_peak_rss_bytes"]),
                "train_peak_rss_bytes": r["train_peak_rss_bytes"],
                "train_peak_rss_gib": common.gib(r["train_peak_rss_bytes"]),
                "peak_anon_bytes": r["peak_anon_bytes"],
                "peak_anon_gib": common.gib(r["peak_anon_bytes"]),
                "train_peak_anon_gib": common.gib(r["train_peak_anon_bytes"]),
                "peak_file_gib": common.gib(r["peak_file_bytes"]),
                "train_peak_file_gib": common.gib(r["train_peak_file_bytes"]),
                "rss_after_imports_gib": common.gib(r["rss_after_imports_bytes"]),
                "load_seconds": r["load_seconds"],
                "s_per_step": round(sum(r["step_seconds"]) / max(len(r["step_seconds"]), 1), 1),
                "tokens_per_step": args.batch * args.seq,
                "loss_first_last": [round(r["losses"][0], 3), round(r["losses"][-1], 3)] if r["losses"] else None,
                "log": str(res.log),
            }
            by_arm[arm] = rec.emit(record)
            records.append(by_arm[arm])
        for arm, r in by_arm.items():
            base = by_arm.get(ARMS[arm].get("reference", ""))
            if base is None:
                continue
            records.append(
                rec.emit(
                    {
                        "bench": "memory-ratio",
                        "name": f"{arm} / {base['name']}",
                        "peak_rss_ratio": round(r["peak_rss_bytes"] / base["peak_rss_bytes"], 2),
                        "train_peak_rss_ratio": _ratio(r["train_peak_rss_bytes"], base["train_peak_rss_bytes"]),
                        "peak_anon_ratio": _ratio(r["peak_anon_bytes"], base["peak_anon_bytes"]),
                        "weight_bytes_ratio": round(r["weight_bytes"] / base["weight_bytes"], 2),
                    }
                )
            )
    finally:
        if not args.keep:
            shutil.rmtree(model_dir, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    return records


def _ratio(a: int | None, b: int | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


MEMORY_COLUMNS = [
    ("arm", "name"),
    ("rest dtype", "non_quantised_dtype"),
    ("fp32 upcast", "kbit_prepare"),
    ("env", "env"),
    ("params", "parameters"),
    ("weights GiB", "weight_gib"),
    ("peak RSS GiB", "peak_rss_gib"),
    ("load peak GiB", "load_peak_rss_gib"),
    ("train peak GiB", "train_peak_rss_gib"),
    ("peak anon GiB", "peak_anon_gib"),
    ("train anon GiB", "train_peak_anon_gib"),
    ("peak mapped-file GiB", "peak_file_gib"),
    ("train mapped-file GiB", "train_peak_file_gib"),
    ("after imports GiB", "rss_after_imports_gib"),
    ("s/step", "s_per_step"),
    ("load avg", "load_avg"),
]
RATIO_COLUMNS = [
    ("comparison", "name"),
    ("peak RSS ratio", "peak_rss_ratio"),
    ("train peak ratio", "train_peak_rss_ratio"),
    ("peak anon ratio", "peak_anon_ratio"),
    ("weight bytes ratio", "weight_bytes_ratio"),
]


def tables(records: list[dict[str, Any]]) -> str:
    for r in records:
        if isinstance(r.get("load_avg"), list):
            r["load_avg"] = " ".join(f"{x:.1f}" for x in r["load_avg"])
    parts = [
        common.table("Memory: LoRA bf16 vs QLoRA", MEMORY_COLUMNS, [r for r in records if r["bench"] == "memory"]),
        common.table("QLoRA / LoRA bf16", RATIO_COLUMNS, [r for r in records if r["bench"] == "memory-ratio"]),
    ]
    return "\n".join(p for p in parts if p)


def main(argv=None) -> int:
    if common.worker_main(argv, run_worker):
        return 0
    common.quiet_libraries()
    common.exit_on_sigterm()
    args = parse_args(argv)
    rec = Recorder(out=args.out)
    rec.emit(common.environment())
    try:
        records = run(args, rec)
    except BenchError as err:
        progress(f"memory: FAILED: {err}")
        return 1
    print(tables([dict(r) for r in records]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
