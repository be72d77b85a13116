"""Training throughput: the classic SFTTrainer recipe (a) against ``kubetune train`` (b), then kubetune's levers.

    python -m benchmarks.train_throughput [--quick] [--steps 8] [--levers default|all|none|NAME,...] [--out FILE]

(a) **baseline**: a plain TRL script as a user writes it on current TRL: ``SFTTrainer(model=<folder>,
    args=SFTConfig(use_cpu=True, packing=True, max_length=..., per_device_train_batch_size=...), peft_config=
    LoraConfig(...))`` on conversational prompt/completion rows; every other setting is TRL's default (bf16 autocast,
    activation checkpointing, packing with padding-free batches, completion-only loss).
(b) **kubetune**: :func:`kubetune.train.train` on the packed_dataset that ``kubetune.prepare`` + ``kubetune.pack``
    made from the same rows, with its automatic settings (precision, threads, activation checkpointing, optimizer),
    in a process started as the ``kubetune`` command starts one: under tcmalloc where it is installed
    (``kubetune.cpu.allocator.allocator_preload_env``). The baseline runs on the C library's malloc, as a user's
    script does.

Both arms get the same model folder, rows, ``max_length``, batch size, LoRA rank/alpha/dropout/targets, learning rate
and schedule (linear, no warm-up: TRL's default) and seed, and run ``--warmup`` steps that are not counted followed by
``--steps`` counted steps, each in its own subprocess, back to back (``--repeats`` alternates the order). Before each
run the script waits (``--quiet-wait``) for other processes to leave the CPUs, and records how busy they were.

Measured per run (one JSON line each): tokens/s (real tokens through the model, padding excluded, counted by
wrapping the trainer's data collator) over the counted steps, and the median step's tokens/s (a neighbour's burst
slows some steps, never speeds one up), s/step, CPU use and tokens per CPU-second, minor page faults per counted
step and the malloc the process ran on, peak RSS of the training run
(imports, loading and training: VmHWM read before and after its reset when training starts), of the training phase
alone, and of the whole process (``wait4``; it includes the held-out scoring, which upcasts the model to fp32 and
builds full logits), MFU, and the held-out loss after training (the same held-out examples of kubetune's packed
``eval/``, scored in fp32, for both).

FLOPs accounting (per real token; stated in every record as ``flops_per_token`` and ``flops_accounting``):
``4 x body linear params`` (forward + activation gradients: the base weights are frozen) ``+ 6 x LoRA params``
(forward + both gradients) ``+ 4 x vocab x hidden x (loss tokens / tokens)`` (the LM head only where a token carries
loss). Attention scores and recomputation (activation checkpointing, the fused head's tile recompute) are excluded:
they are real work but not model FLOPs (``attn_flops_per_token_excluded`` estimates the attention part). ``mfu_4n``
uses the simpler ``4 x all linear params incl. the LM head`` per token. Both divide by the matmul peak of the dtype
the run computes in: the best square-matmul figure measured in this invocation (before and after the runs);
``mfu_of_shape_peak`` divides by what the machine attains on the model's own layer GEMM shapes instead.

Levers (``--levers``) are kubetune runs with one change each against its automatic settings (and a few
combinations), shorter (``--lever-warmup``, ``--lever-steps``). A lever that sets what the automatic settings
already chose on this machine is skipped. Two levers change the recipe instead: ``baseline + bf16=False`` and
``baseline + tcmalloc`` (the recipe on the allocator kubetune preloads; its record carries kubetune's automatic run
against it, ``kubetune_vs_this``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import BenchError, Recorder, progress
from kubetune.cpu import allocator

# kubetune runs with the C library's malloc (the glibc levers need it)
GLIBC = {"KUBETUNE_ALLOCATOR": "system"}
# Levers: kubetune variants, each one change against kubetune's automatic settings (combinations say so). "eval":
# also score the held-out loss (the levers that change numerics).
LEVERS: dict[str, dict[str, Any]] = {
    "precision=bf16": {"overrides": {"train.precision": "bf16"}, "eval": True},
    "precision=fp32": {"overrides": {"train.precision": "fp32"}, "eval": True},
    "lm_head=trl (TRL's fused head)": {"overrides": {"cpu.lm_head": "trl"}, "eval": True},
    "lm_head=chunked": {"overrides": {"cpu.lm_head": "chunked"}, "eval": True},
    "precision=fp32 + lm_head=trl": {"overrides": {"train.precision": "fp32", "cpu.lm_head": "trl"}, "eval": True},
    "activation_checkpointing=on": {"overrides": {"train.activation_checkpointing": "on"}},
    "optim=adamw_torch (foreach)": {"overrides": {"train.optim": "adamw_torch"}},
    "lora.dropout=0": {"overrides": {"lora.dropout": 0.0}, "eval": True},
    "dropout_sampler=torch (nn.Dropout)": {"overrides": {"cpu.dropout_sampler": "torch"}, "eval": True},
    "threads=1": {"overrides": {"train.threads": 1}},
    "micro_batch_size=4 (whole batch per pass)": {"overrides": {"train.micro_batch_size": 4}},
    "micro_batch_size=2": {"overrides": {"train.micro_batch_size": 2}},
    "micro_batch_size=1": {"overrides": {"train.micro_batch_size": 1}},
    "lean_layers=off": {"overrides": {"cpu.lean_layers": "off"}, "eval": True},
    "split_gemms=off": {"overrides": {"cpu.split_gemms": "off"}},
    "logging_steps=10": {"overrides": {"train.logging_steps": 10}},
    # inductor compiles on one thread: low CPU use is its nature there, not a neighbour's doing, so no retry
    "compile=true": {"overrides": {"train.compile": True}, "retries": 0},
    # The C library's malloc instead of the tcmalloc kubetune preloads where it is installed (the train stage then
    # tunes glibc's mmap threshold itself).
    "allocator=system (glibc malloc)": {"overrides": {}, "env": GLIBC},
    # glibc malloc's dynamic mmap threshold keeps freed activation buffers in its heaps; a fixed one returns them.
    "MALLOC_MMAP_THRESHOLD_=65536": {"overrides": {}, "env": {**GLIBC, "MALLOC_MMAP_THRESHOLD_": "65536"}},
    "MALLOC_MMAP_THRESHOLD_=1048576": {"overrides": {}, "env": {**GLIBC, "MALLOC_MMAP_THRESHOLD_": "1048576"}},
    "MALLOC_MMAP_THRESHOLD_=8388608": {"overrides": {}, "env": {**GLIBC, "MALLOC_MMAP_THRESHOLD_": "8388608"}},
    # glibc also returns the free top of its heap to the kernel above 128 KiB; faulting it back in costs time
    "MALLOC_TRIM_THRESHOLD_=1 GiB": {"overrides": {}, "env": {**GLIBC, "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}},
    # The baseline recipe with one change, to separate dtype from everything else.
    "baseline + bf16=False": {"arm": "baseline", "baseline_bf16": False},
    # The recipe on the tcmalloc that kubetune preloads (a user could preload it too): how much of the gap between
    # the arms is the allocator alone. Glibc's malloc hands the recipe's large buffers back to the kernel, and every
    # step faults them in again (the page_faults_per_step field).
    "baseline + tcmalloc": {"arm": "baseline", "tcmalloc": True},
}
DEFAULT_LEVERS = [
    "precision=bf16",
    "precision=fp32",
    "lm_head=trl (TRL's fused head)",
    "lm_head=chunked",
    "precision=fp32 + lm_head=trl",
    "activation_checkpointing=on",
    "optim=adamw_torch (foreach)",
    "lora.dropout=0",
    "dropout_sampler=torch (nn.Dropout)",
    "threads=1",
    "compile=true",
    "allocator=system (glibc malloc)",
    "baseline + tcmalloc",
    "split_gemms=off",
    "micro_batch_size=4 (whole batch per pass)",
    "micro_batch_size=2",
    "lean_layers=off",
]


# ==============================================================================================================
# Worker side: one training run in this process


class Probe:
    """Per-step timestamps and per-batch token counts, hooked into every SFTTrainer built in this process."""

    def __init__(self) -> None:
        self.trainer = None
        self.batch_tokens: list[int] = []
        self.batch_loss_tokens: list[int] = []
        self.batch_attn_pairs: list[int] = []
        self.step_end: list[float] = []
        self.step_cpu: list[float] = []
        self.step_faults: list[int] = []  # minor page faults of this process, at each step's end
        self.train_begin: float | None = None
        self.train_begin_cpu: float | None = None
        self.train_begin_faults: int | None = None
        self.hwm_reset = False
        self.vm_hwm_train: int | None = None
        self.vm_hwm_load: int | None = None
        self.sampler: common.RssSampler | None = None
        self.rss_train: dict[str, int | None] = {}
        self.gpu_peak: int | None = None


def _causal_pairs(position_ids) -> int:
    """Query-key pairs a causal mask allows, summed over the sequences that position ids delimit."""
    import torch

    pos = position_ids.reshape(-1).to(torch.long)
    starts = [*torch.nonzero(pos == 0).flatten().tolist(), pos.numel()]
    return sum((b - a) * (b - a + 1) // 2 for a, b in itertools.pairwise(starts))


class CountingCollator:
    """Wraps a data collator: counts the real (non-padding) and loss-carrying tokens of each batch, in order."""

    def __init__(self, inner, probe: Probe):
        self.inner = inner
        self.probe = probe

    def __call__(self, features):
        batch = self.inner(features)
        # Rows reach the collator unpadded (kubetune's packed rows, TRL's packed sequences): their lengths are the
        # real tokens, whatever padding the collator then adds.
        real = sum(len(f["input_ids"]) for f in features)
        labels = batch["labels"]
        self.probe.batch_tokens.append(real)
        self.probe.batch_loss_tokens.append(int((labels[..., 1:] != -100).sum()))
        if batch.get("position_ids") is not None:
            self.probe.batch_attn_pairs.append(_causal_pairs(batch["position_ids"]))
        return batch


def _minor_faults() -> int:
    """Minor page faults of this process so far (each one a page the kernel mapped in, zeroed if it was new)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def instrument(probe: Probe) -> None:
    """Patch ``trl.SFTTrainer.__init__`` so that both arms are measured by the very same hooks."""
    import torch
    import trl
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            probe.vm_hwm_load = common.vm_hwm_bytes()  # imports and loading, before the reset
            probe.hwm_reset = common.reset_vm_hwm()
            probe.sampler = common.RssSampler(interval=0.05).start()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            probe.train_begin = time.perf_counter()
            probe.train_begin_cpu = time.process_time()
            probe.train_begin_faults = _minor_faults()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            probe.step_end.append(time.perf_counter())
            probe.step_cpu.append(time.process_time())
            probe.step_faults.append(_minor_faults())

        def on_train_end(self, args, state, control, **kw):
            probe.vm_hwm_train = common.vm_hwm_bytes()
            probe.rss_train = probe.sampler.stop() if probe.sampler else {}
            if torch.cuda.is_available():
                probe.gpu_peak = torch.cuda.max_memory_allocated()

    original = trl.SFTTrainer.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.data_collator = CountingCollator(self.data_collator, probe)
        self.add_callback(StepTimer())
        probe.trainer = self

    trl.SFTTrainer.__init__ = __init__


def _model_shape(model) -> dict[str, Any]:
    """Parameter counts for the FLOPs accounting: body linears, LM head, trainable LoRA."""
    import torch

    body = head = 0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or "lora_" in name:
            continue
        n = m.in_features * m.out_features
        if name.split(".")[-1] == "lm_head":
            head += n
        else:
            body += n
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.config
    if head == 0:  # a head that is not an nn.Linear: take it from the config
        head = cfg.vocab_size * cfg.hidden_size
    heads = getattr(cfg, "num_attention_heads", 0)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // max(heads, 1))
    return {
        "body_linear_params": body,
        "lm_head_params": head,
        "lora_params": lora,
        "layers": getattr(cfg, "num_hidden_layers", 0),
        "attn_width": heads * head_dim,
    }


def _param_dtype(model) -> str:
    import torch

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    counts: dict[str, int] = {}
    for p in model.parameters():
        key = names.get(p.dtype, str(p.dtype))
        counts[key] = counts.get(key, 0) + p.numel()
    return max(counts, key=counts.get) if counts else "?"


def _loss_sums(model, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8):
    """(summed cross-entropy, loss tokens) over the label tokens of ``examples``; token t scored by logits at t-1."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(examples, key=lambda e: -len(e[0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (i, lab) in enumerate(chunk):
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(i)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        target = labels[:, 1:]
        keep = target != -100
        total += float(F.cross_entropy(logits[keep].float(), target[keep], reduction="sum"))
        count += int(keep.sum())
    return total, count


def _heldout_examples(packed: Path, n: int) -> list[tuple[list[int], list[int]]]:
    """The first ``n`` held-out examples of a packed_dataset's ``eval/`` (one example per row, see
    docs/architecture.md)."""
    from datasets import load_from_disk

    ds = load_from_disk(str(packed / "eval"))
    ds = ds.select(range(min(n, len(ds))))
    return [(ids, lab) for ids, lab in zip(ds["input_ids"], ds["labels"], strict=True) if len(ids) > 1]


def _heldout_loss(model, spec: dict[str, Any]) -> dict[str, Any]:
    """Held-out loss of the trained adapter and of its base on kubetune's packed eval examples (fp32 on a CPU)."""
    import torch
    from transformers import AutoTokenizer

    if not spec.get("eval_rows"):
        return {}
    packed = Path(spec["packed"])
    examples = _heldout_examples(packed, spec["eval_rows"])
    if not examples:
        return {}
    pad = AutoTokenizer.from_pretrained(str(packed / "tokenizer")).pad_token_id
    model.eval()
    device = next(model.parameters()).device
    if device.type == "cpu" and spec.get("method") != "qlora":
        model.float()  # score both arms in the same precision, whatever they trained in
    t0 = time.perf_counter()
    with torch.autocast(device.type, enabled=False):
        adapter, tokens = _loss_sums(model, examples, pad)
        with model.disable_adapter():
            base, _ = _loss_sums(model, examples, pad)
    return {
        "eval_loss": adapter / max(tokens, 1),
        "base_eval_loss": base / max(tokens, 1),
        "eval_tokens": tokens,
        "eval_examples": len(examples),
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }


def _run_baseline(spec: dict[str, Any], probe: Probe) -> dict[str, Any]:
    """The classic recipe, as a user writes it with current TRL (see the module docstring)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = []
    with open(Path(spec["prepared"]) / "train.jsonl", encoding="utf-8") as fh:
        for line in fh:
            messages = json.loads(line)["messages"]
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    train_ds = Dataset.from_list(rows)
    # The tokenizer kubetune's pack saved: the same chat template, so both arms format conversations identically.
    tokenizer = AutoTokenizer.from_pretrained(str(Path(spec["packed"]) / "tokenizer"))
    cuda = torch.cuda.is_available()
    quantization_config = None
    model_init_kwargs = None
    if spec["method"] == "qlora":
        from transformers import BitsAndBytesConfig

        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model_init_kwargs = {"dtype": torch.bfloat16}
    extra = {} if spec.get("baseline_bf16", True) else {"bf16": False}
    args = SFTConfig(
        output_dir=str(Path(spec["workdir"]) / "baseline-out"),
        use_cpu=not cuda,
        packing=True,
        max_length=spec["max_length"],
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["learning_rate"],
        max_steps=spec["warmup"] + spec["steps"],
        seed=spec["seed"],
        save_strategy="no",
        report_to="none",
        model_init_kwargs=model_init_kwargs,
        **extra,
    )
    peft_config = LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=spec["lora_dropout"],
        target_modules=spec["target_modules"],
        task_type="CAUSAL_LM",
    )
    t0 = time.perf_counter()
    trainer = SFTTrainer(
        model=spec["model"],
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quantization_config,
    )
    setup_seconds = time.perf_counter() - t0
    trainer.train()
    return {
        "setup_seconds": round(setup_seconds, 1),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "activation_checkpointing": bool(args.gradient_checkpointing or getattr(args, "activation_checkpointing", 0)),
        "optim": getattr(args.optim, "value", str(args.optim)),
        "lm_head": "trl",
        "loss_curve": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
    }


def _run_kubetune(spec: dict[str, Any], probe: Probe) -> dict[str, Any]:
    from kubetune.config import from_dict
    from kubetune.train import train

    work = Path(spec["workdir"])
    raw = {
        "model": {"name_or_path": spec["model"]},
        "data": {"path": spec["data"]},
        "pack": {"max_length": spec["max_length"]},
        "method": spec["method"],
        "lora": {
            "r": spec["lora_r"],
            "alpha": spec["lora_alpha"],
            "dropout": spec["lora_dropout"],
            "target_modules": spec["target_modules"],
        },
        "train": {
            "max_steps": spec["warmup"] + spec["steps"],
            "batch_size": spec["batch_size"],
            "learning_rate": spec["learning_rate"],
            "lr_scheduler": "linear",  # the baseline's (TRL's default) schedule, so only the implementation differs
            "warmup_ratio": 0.0,
            "seed": spec["seed"],
            "checkpoint_dir": str(work / f"{spec['name']}-checkpoints"),
            "resume": "never",
        },
        "output_dir": str(work),
    }
    cfg = from_dict(raw).replace(**spec.get("overrides", {}))
    out = work / f"{spec['name']}-adapter"
    shutil.rmtree(out, ignore_errors=True)  # a rerun must train again, not find its output up to date
    t0 = time.perf_counter()
    train(cfg, spec["packed"], out, overwrite=True)
    summary = json.loads((out / "training_summary.json").read_text())
    settings = {k: v["value"] for k, v in summary["settings"].items()}
    return {
        "stage_seconds": round(time.perf_counter() - t0, 1),
        "precision": settings["precision"],
        "activation_checkpointing": bool(settings["activation_checkpointing"]),
        "optim": settings["optim"],
        "threads": settings["threads"],
        "lm_head": settings.get("lm_head", "trl"),
        "settings": summary["settings"],
        "train_tokens_per_second_summary": summary["train_tokens_per_second"],
        "loss_curve": summary["loss_curve"],
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    probe = Probe()
    instrument(probe)
    t0 = time.perf_counter()
    result = _run_baseline(spec, probe) if spec["arm"] == "baseline" else _run_kubetune(spec, probe)
    result["run_seconds"] = round(time.perf_counter() - t0, 1)
    result["method"] = spec["method"]
    if probe.trainer is None or not probe.step_end:
        raise RuntimeError("no training step was recorded: the SFTTrainer hook did not run")
    model = probe.trainer.model
    result.update(
        {
            "param_dtype": _param_dtype(model),
            "shape": _model_shape(model),
            "step_end": [t - probe.train_begin for t in probe.step_end],
            "step_cpu": [t - probe.train_begin_cpu for t in probe.step_cpu],
            "step_faults": [n - probe.train_begin_faults for n in probe.step_faults],
            "batch_tokens": probe.batch_tokens,
            "batch_loss_tokens": probe.batch_loss_tokens,
            "batch_attn_pairs": probe.batch_attn_pairs,
            "vm_hwm_train_bytes": probe.vm_hwm_train if probe.hwm_reset else None,
            "vm_hwm_load_bytes": probe.vm_hwm_load,
            "train_peak_anon_bytes": probe.rss_train.get("peak_anon_bytes"),
            "peak_gpu_memory_bytes": probe.gpu_peak,
            "torch_threads": torch.get_num_threads(),
            "malloc": allocator.loaded_allocator(),  # the preloaded malloc's path; None: the C library's
            "grad_accum": int(probe.trainer.args.gradient_accumulation_steps),
            "micro_batch_size": int(probe.trainer.args.per_device_train_batch_size),
        }
    )
    result.update(_heldout_loss(model, spec))
    return result


# ==============================================================================================================
# Parent side


def summarise(name: str, arm: str, res: common.WorkerResult, *, warmup: int) -> dict[str, Any]:
    """Turn one worker's raw timings into the record: tokens/s, s/step, FLOPs, memory, quality (MFU comes later,
    from :func:`apply_peaks`, once every peak measurement of the invocation is in)."""
    r = res.result
    ends, cpu = [0.0, *r["step_end"]], [0.0, *r["step_cpu"]]
    faults = [0, *r["step_faults"]] if r.get("step_faults") else None
    steps = len(r["step_end"])
    counted = steps - warmup
    if counted < 1:
        raise BenchError(f"{name}: only {steps} steps ran; need more than the {warmup} warm-up steps")
    # Optimizer step k trains on collated batches k*g .. k*g+g-1 (g = gradient accumulation: a micro-batch per
    # pass), in order; batches the data loader built ahead of the last step are not counted.
    g = int(r.get("grad_accum") or 1)

    def per_step(values: list[int]) -> list[int]:
        return [sum(values[k * g : (k + 1) * g]) for k in range(steps)]

    step_tokens = per_step(r["batch_tokens"])
    tokens = sum(step_tokens[warmup:steps])
    loss_tokens = sum(per_step(r["batch_loss_tokens"])[warmup:steps])
    seconds = ends[steps] - ends[warmup]
    cpu_seconds = cpu[steps] - cpu[warmup]
    threads = r.get("threads") or r.get("torch_threads") or 1
    shape = r["shape"]
    loss_fraction = loss_tokens / max(tokens, 1)
    flops = 4 * shape["body_linear_params"] + 6 * shape["lora_params"] + 4 * shape["lm_head_params"] * loss_fraction
    flops_4n = 4 * (shape["body_linear_params"] + shape["lm_head_params"])
    pairs = sum(per_step(r["batch_attn_pairs"])[warmup:steps]) if r["batch_attn_pairs"] else None
    # Causal attention, forward (QK^T and AV: 4 x width per pair) + activation gradients (2x): 12 x width x pairs.
    attn = 12 * shape["layers"] * shape["attn_width"] * pairs / max(tokens, 1) if pairs else None
    tps = tokens / seconds if seconds > 0 else 0.0
    # A neighbour's burst slows some steps and never speeds any up: the median step is the robust figure.
    step_rates = [step_tokens[i] / (ends[i + 1] - ends[i]) for i in range(warmup, steps) if ends[i + 1] > ends[i]]
    median_tps = statistics.median(step_rates) if step_rates else 0.0
    dtype = r.get("precision", "fp32")
    hwms = [b for b in (r.get("vm_hwm_load_bytes"), r.get("vm_hwm_train_bytes")) if b]
    run_peak = max(hwms) if len(hwms) == 2 else None
    record = {
        "bench": "train",
        "name": name,
        "arm": arm,
        "method": r.get("method"),
        "precision": dtype,
        "param_dtype": r.get("param_dtype"),
        "activation_checkpointing": r.get("activation_checkpointing"),
        "optim": r.get("optim"),
        "lm_head": r.get("lm_head"),
        "threads": threads,
        "malloc": Path(r["malloc"]).name if r.get("malloc") else "libc",
        "micro_batch_size": r.get("micro_batch_size"),
        "grad_accum": g,
        "warmup_steps": warmup,
        "counted_steps": counted,
        "warmup_seconds": round(ends[warmup], 1),
        "tokens": tokens,
        "loss_token_fraction": round(loss_fraction, 3),
        "seconds": float(f"{seconds:.4g}"),
        "s_per_step": float(f"{seconds / counted:.4g}"),
        "tokens_per_second": round(tps, 1),
        "tokens_per_second_median_step": round(median_tps, 1),
        "cpu_util": round(cpu_seconds / seconds / threads, 2) if seconds > 0 else None,
        # Throughput per CPU-second used: less sensitive to a neighbour taking cores than tokens/s, not a substitute.
        "tokens_per_cpu_second": round(tokens / cpu_seconds, 1) if cpu_seconds > 0 else None,
        # Pages the kernel mapped in per counted step: an allocator that hands big buffers back to the kernel
        # (glibc's, for the baseline) makes every step fault zeroed pages in again; how fast the kernel serves them
        # moves that arm's speed.
        "page_faults_per_step": round((faults[steps] - faults[warmup]) / counted) if faults else None,
        # The training run's own peak (imports, loading, training), without the held-out scoring that follows it
        "run_peak_rss_bytes": run_peak,
        "run_peak_rss_gib": common.gib(run_peak),
        "peak_rss_bytes": res.peak_rss_bytes,
        "peak_rss_gib": common.gib(res.peak_rss_bytes),
        "train_peak_rss_bytes": r.get("vm_hwm_train_bytes"),
        "train_peak_rss_gib": common.gib(r.get("vm_hwm_train_bytes")),
        "train_peak_anon_gib": common.gib(r.get("train_peak_anon_bytes")),
        "peak_gpu_memory_gib": common.gib(r.get("peak_gpu_memory_bytes")),
        "flops_per_token": round(flops),
        "flops_per_token_4n": round(flops_4n),
        "attn_flops_per_token_excluded": round(attn) if attn else None,
        "flops_accounting": "4*body_linear + 6*lora + 4*lm_head*loss_fraction (attention, recompute excluded)",
        "achieved_gflops": round(flops * tps / 1e9, 1),
        "eval_loss": r.get("eval_loss"),
        "base_eval_loss": r.get("base_eval_loss"),
        "eval_tokens": r.get("eval_tokens"),
        "final_train_loss": r["loss_curve"][-1][1] if r.get("loss_curve") else None,
        "worker_wall_seconds": round(res.wall_seconds, 1),
        "log": str(res.log),
    }
    if "settings" in r:
        record["settings"] = r["settings"]
    return record


def layer_gemm_shapes(config, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of one decoder layer's matmuls for ``tokens`` tokens: forward and activation-gradient shapes."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q = heads * head_dim
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    inter = config.intermediate_size
    fwd = [(tokens, h, q), (tokens, h, kv), (tokens, h, kv), (tokens, q, h), (tokens, h, inter), (tokens, h, inter)]
    fwd.append((tokens, inter, h))
    return fwd + [(m, n, k) for m, k, n in fwd]


def shape_peak_record(model_dir: str, tokens: int, threads: int, device: str) -> dict[str, Any]:
    """The GFLOP/s this machine attains on the model's own layer GEMMs at one step's token count, now."""
    from transformers import AutoConfig

    shapes = layer_gemm_shapes(AutoConfig.from_pretrained(model_dir), tokens)
    dtypes = ("fp32", "bf16", "fp16") if device == "cuda" else ("fp32", "bf16")
    return {
        "bench": "peak",
        "name": f"model-shaped GEMMs ({tokens} tokens)",
        "device": device,
        "threads": threads,
        **{f"shape_{d}_gflops": common.gemm_rate(shapes, d, threads, device=device) for d in dtypes},
    }


def apply_peaks(record: dict[str, Any], peaks: dict[str, float]) -> dict[str, Any]:
    """MFU against the matmul peak of the record's dtype: the best figure measured in this invocation (a busy
    neighbour lowers a peak measurement, so the best is the closest to the machine's; it gives the lowest MFU)."""
    peak = peaks.get(record["precision"])
    tps = record["tokens_per_second"]
    record["peak_gflops"] = peak
    record["mfu"] = round(record["flops_per_token"] * tps / (peak * 1e9), 3) if peak else None
    record["mfu_4n"] = round(record["flops_per_token_4n"] * tps / (peak * 1e9), 3) if peak else None
    shape_peak = peaks.get(f"shape_{record['precision']}")
    record["shape_peak_gflops"] = shape_peak
    record["mfu_of_shape_peak"] = round(record["flops_per_token"] * tps / (shape_peak * 1e9), 3) if shape_peak else None
    return record


def best_peaks(records: list[dict[str, Any]]) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for r in records:
        if r["bench"] == "peak":
            for k, v in r.items():
                if k.endswith("_gflops") and isinstance(v, int | float):
                    d = k.removesuffix("_gflops")
                    peaks[d] = max(peaks.get(d, 0.0), v)
    return peaks


def _prepare_data(args, work: Path, model_dir: str) -> tuple[Path, Path]:
    """kubetune prepare + pack of the rows (not timed here; benchmarks.data_stages measures them)."""
    from kubetune.config import from_dict
    from kubetune.pack import pack
    from kubetune.prepare import prepare

    cfg = from_dict(
        {
            "model": {"name_or_path": model_dir},
            "data": {"path": str(args.data), "eval_size": args.eval_rows or 0.05, "max_rows": args.rows},
            "pack": {"max_length": args.max_length},
        }
    )
    prepared = prepare(cfg, work / "prepared", overwrite=True)
    packed = pack(cfg, prepared, work / "packed", overwrite=True)
    return prepared, packed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__.split("\n\n")[0])
    common.common_args(p)
    p.add_argument("--model", default=common.SMOLLM2, help="model folder, .gguf, pkg:// file or hub id")
    p.add_argument("--data", type=Path, default=common.LIMA, help="raw rows (any format kubetune prepare reads)")
    p.add_argument("--rows", type=int, default=None, help="read at most this many rows (default: all)")
    p.add_argument("--method", choices=("lora", "qlora"), default="lora")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="steps run first and not counted")
    p.add_argument("--steps", type=int, default=8, help="counted steps per arm")
    p.add_argument("--eval-rows", type=int, default=32, help="held-out examples scored after training (0: skip)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--target-modules", default="q_proj,v_proj", help="comma-separated, or all-linear")
    p.add_argument("--repeats", type=int, default=1, help="pairs to run; the order alternates (a b, b a, ...)")
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="run again (at most this often) a run whose CPU use fell below --min-cpu-util (a neighbour took the "
        "cores); the disturbed figures are kept as bench=train-disturbed",
    )
    p.add_argument("--min-cpu-util", type=float, default=0.8)
    p.add_argument("--levers", default="default", help=f"default, all, none, or a comma list of: {', '.join(LEVERS)}")
    p.add_argument("--lever-steps", type=int, default=3, help="counted steps per lever run")
    p.add_argument("--lever-warmup", type=int, default=1, help="warm-up steps per lever run")
    args = p.parse_args(argv)
    if args.quick:
        args.rows = args.rows or 96
        args.max_length = min(args.max_length, 256)
        args.warmup, args.steps, args.eval_rows = 1, 2, min(args.eval_rows, 8)
        args.levers = "none" if args.levers == "default" else args.levers
        args.quiet_wait = min(args.quiet_wait, 15.0)
        args.retries = 0
    return args


def _lever_names(value: str) -> list[str]:
    if value in ("none", ""):
        return []
    if value == "default":
        return list(DEFAULT_LEVERS)
    if value == "all":
        return list(LEVERS)
    names = [n.strip() for n in value.split(";" if ";" in value else ",") if n.strip()]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise SystemExit(f"--levers: unknown {unknown}; choose from {list(LEVERS)}")
    return names


def run(args: argparse.Namespace, rec: Recorder) -> list[dict[str, Any]]:
    """The whole benchmark; returns the train records (also emitted)."""
    from kubetune import models
    from kubetune.config import ModelConfig

    if not Path(args.data).is_file():
        raise BenchError(f"{args.data}: data file not found (the LIMA rows live in ../shared/data/lima)")
    threads = common.threads_of(args.threads)
    work = common.make_workdir(args.workdir, "train")
    model_dir = models.resolve(ModelConfig(name_or_path=args.model)).path
    progress(f"train: model {model_dir}; preparing and packing {args.data} (max_length {args.max_length})")
    prepared, packed = _prepare_data(args, work, model_dir)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak_records = [rec.emit(common.peak_record(threads, "before training", device))]
    peak_records.append(rec.emit(shape_peak_record(model_dir, args.batch * args.max_length, threads, device)))
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    base_spec = {
        "model": model_dir,
        "data": str(args.data),
        "prepared": str(prepared),
        "packed": str(packed),
        "workdir": str(work),
        "method": args.method,
        "max_length": args.max_length,
        "batch_size": args.batch,
        "learning_rate": args.lr,
        "seed": args.seed,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "target_modules": targets,
    }

    def one(
        name: str,
        arm: str,
        warmup: int,
        steps: int,
        eval_rows: int,
        env: dict[str, str] | None = None,
        retries: int | None = None,
        **extra,
    ) -> dict[str, Any]:
        spec = {**base_spec, "name": _slug(name), "arm": arm, "warmup": warmup, "steps": steps, **extra}
        if arm == "kubetune":  # started as the `kubetune` command starts its training process (a lever's env on top)
            lever_env = env or {}
            env = {**(allocator.allocator_preload_env({**os.environ, **lever_env}) or {}), **lever_env}
        spec["eval_rows"] = eval_rows
        retries = args.retries if retries is None else retries
        for attempt in range(1 + retries):
            quiet = common.wait_for_quiet(args.quiet_wait) if args.quiet_wait else {}
            progress(
                f"train: {name} ({warmup} warm-up + {steps} counted steps; CPUs busy before: "
                f"{quiet.get('busy_before')})"
            )
            res = common.run_worker(
                "train_throughput",
                spec,
                workdir=work,
                name=_slug(name),
                timeout_s=args.timeout,
                verbose=args.verbose,
                env=env,
            )
            r = summarise(name, arm, res, warmup=warmup)
            r.update(quiet, attempt=attempt + 1)
            progress(
                f"train: {name}: {r['tokens_per_second']} tokens/s, {r['s_per_step']} s/step, CPU use "
                f"{r['cpu_util']}, peak RSS {r['peak_rss_gib']} GiB, held-out loss {r['eval_loss']}"
            )
            if r["cpu_util"] is None or r["cpu_util"] >= args.min_cpu_util or attempt == retries:
                return r
            # Another process took the cores during the counted steps: keep the figures, then run it again.
            progress(f"train: {name}: CPU use {r['cpu_util']} < {args.min_cpu_util}: disturbed, running it again")
            disturbed.append(rec.emit({**r, "bench": "train-disturbed"}))
        return r

    runs: list[dict[str, Any]] = []
    disturbed: list[dict[str, Any]] = []
    pairs = []
    for i in range(args.repeats):
        order = ["baseline", "kubetune"] if i % 2 == 0 else ["kubetune", "baseline"]
        got = {}
        for arm in order:
            name = arm if args.repeats == 1 else f"{arm} #{i + 1}"
            got[arm] = one(name, arm, args.warmup, args.steps, args.eval_rows)
            runs.append(got[arm])
        pairs.append(got)
    auto = pairs[0]["kubetune"]
    levers: list[dict[str, Any]] = []
    for lever in _lever_names(args.levers):
        opts = LEVERS[lever]
        overrides = opts.get("overrides", {})
        chosen = {f"train.{k}": v["value"] for k, v in auto.get("settings", {}).items()}
        if overrides and all(k in chosen and chosen[k] == v for k, v in overrides.items()):
            progress(f"train: skipping lever {lever!r}: it is already the automatic choice")
            continue
        env = opts.get("env")
        if opts.get("tcmalloc"):
            # tcmalloc preloaded as the `kubetune` command preloads it, whatever KUBETUNE_ALLOCATOR says here
            env = allocator.allocator_preload_env({k: v for k, v in os.environ.items() if k != allocator.ALLOCATOR_ENV})
            if env is None:
                progress(f"train: skipping lever {lever!r}: no tcmalloc is installed (or an allocator is preloaded)")
                levers.append({"bench": "train-lever", "name": lever, "error": "no tcmalloc installed to preload"})
                continue
        try:
            r = one(
                lever,
                opts.get("arm", "kubetune"),
                args.lever_warmup,
                args.lever_steps,
                args.eval_rows if opts.get("eval") else 0,
                overrides=overrides,
                env=env,
                retries=opts.get("retries"),
                baseline_bf16=opts.get("baseline_bf16", True),
            )
        except BenchError as err:
            progress(f"train: lever {lever!r} failed: {err}")
            levers.append({"bench": "train-lever", "name": lever, "error": str(err).splitlines()[0]})
            continue
        ref = auto if r["arm"] == "kubetune" else pairs[0]["baseline"]
        r.update(bench="train-lever", reference=ref["name"])
        r["vs_reference"] = round(r["tokens_per_second"] / ref["tokens_per_second"], 2)
        r["vs_reference_median_step"] = _div(r["tokens_per_second_median_step"], ref["tokens_per_second_median_step"])
        r["vs_reference_per_cpu_second"] = (
            round(r["tokens_per_cpu_second"] / ref["tokens_per_cpu_second"], 2)
            if ref["tokens_per_cpu_second"]
            else None
        )
        if r["arm"] == "baseline":  # a variant of the recipe: kubetune's automatic run against it
            r["kubetune_vs_this"] = _div(auto["tokens_per_second"], r["tokens_per_second"])
        if r["arm"] == "kubetune":
            base = pairs[0]["baseline"]
            r["vs_baseline"] = _div(r["tokens_per_second"], base["tokens_per_second"])
            r["vs_baseline_median_step"] = _div(
                r["tokens_per_second_median_step"], base["tokens_per_second_median_step"]
            )
        if lever == "compile=true":
            # Compile time shows up in the warm-up; steps needed before the faster steps repay it.
            extra_warmup = r["warmup_seconds"] - auto["warmup_seconds"] * args.lever_warmup / max(args.warmup, 1)
            saved = auto["s_per_step"] - r["s_per_step"]
            r["compile_seconds_est"] = round(extra_warmup, 1)
            r["break_even_steps"] = round(extra_warmup / saved) if saved > 0 else None
        levers.append(r)
    peak_records.append(rec.emit(common.peak_record(threads, "after training", device)))
    peak_records.append(rec.emit(shape_peak_record(model_dir, args.batch * args.max_length, threads, device)))

    # MFU against the best peak of the invocation; then everything is emitted, in order.
    peaks = best_peaks(peak_records)
    records: list[dict[str, Any]] = []
    for r in runs:
        records.append(rec.emit(apply_peaks(r, peaks)))
    for i, got in enumerate(pairs):
        records.append(rec.emit(_ratio_record(got["baseline"], got["kubetune"], i + 1 if args.repeats > 1 else None)))
    for r in levers:
        records.append(rec.emit(apply_peaks(r, peaks) if "tokens_per_second" in r else r))
    progress(f"train: scratch folder {work}" + ("" if args.keep else " (removed)"))
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return records


def _ratio_record(a: dict[str, Any], b: dict[str, Any], repeat: int | None) -> dict[str, Any]:
    def ratio(key: str) -> float | None:
        return round(b[key] / a[key], 2) if a.get(key) and b.get(key) is not None else None

    loss_delta = (
        round(b["eval_loss"] - a["eval_loss"], 4) if a.get("eval_loss") is not None and b.get("eval_loss") else None
    )
    return {
        "bench": "train-ratio",
        "name": "kubetune / baseline" + (f" #{repeat}" if repeat else ""),
        "tokens_per_second_ratio": ratio("tokens_per_second"),
        "s_per_step_ratio": ratio("s_per_step"),
        "run_peak_rss_ratio": ratio("run_peak_rss_bytes"),
        "peak_rss_ratio": ratio("peak_rss_bytes"),
        "train_peak_rss_ratio": ratio("train_peak_rss_bytes"),
        "peak_gpu_memory_ratio": ratio("peak_gpu_memory_gib"),
        "eval_loss_delta": loss_delta,
        "median_step_ratio": ratio("tokens_per_second_median_step"),
        "tokens_per_cpu_second_ratio": ratio("tokens_per_cpu_second"),
        "baseline_mfu": a.get("mfu"),
        "kubetune_mfu": b.get("mfu"),
    }


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()[:60]


TRAIN_COLUMNS = [
    ("run", "name"),
    ("dtype", "precision"),
    ("act. ckpt", "activation_checkpointing"),
    ("optim", "optim"),
    ("LM head", "lm_head"),
    ("threads", "threads"),
    ("malloc", "malloc"),
    ("micro-batch", "micro_batch_size"),
    ("steps", "counted_steps"),
    ("tokens/s", "tokens_per_second"),
    ("median step tokens/s", "tokens_per_second_median_step"),
    ("s/step", "s_per_step"),
    ("CPU use", "cpu_util"),
    ("tokens/CPU-s", "tokens_per_cpu_second"),
    ("page faults/step", "page_faults_per_step"),
    ("run peak RSS GiB", "run_peak_rss_gib"),
    ("train RSS GiB", "train_peak_rss_gib"),
    ("peak RSS incl. scoring GiB", "peak_rss_gib"),
    ("train anon GiB", "train_peak_anon_gib"),
    ("MFU", "mfu"),
    ("MFU (4N)", "mfu_4n"),
    ("of shape peak", "mfu_of_shape_peak"),
    ("held-out loss", "eval_loss"),
    ("base loss", "base_eval_loss"),
    ("load avg", "load_avg"),
]
LEVER_COLUMNS = [
    ("lever", "name"),
    ("dtype", "precision"),
    ("tokens/s", "tokens_per_second"),
    ("s/step", "s_per_step"),
    ("median step tokens/s", "tokens_per_second_median_step"),
    ("vs reference", "vs_reference"),
    ("median-step vs ref.", "vs_reference_median_step"),
    ("per CPU-s vs ref.", "vs_reference_per_cpu_second"),
    ("reference", "reference"),
    ("vs baseline", "vs_baseline"),
    ("median-step vs baseline", "vs_baseline_median_step"),
    ("kubetune vs it", "kubetune_vs_this"),
    ("MFU", "mfu"),
    ("held-out loss", "eval_loss"),
    ("warm-up s", "warmup_seconds"),
    ("train RSS GiB", "train_peak_rss_gib"),
    ("CPU use", "cpu_util"),
    ("load avg", "load_avg"),
]
RATIO_COLUMNS = [
    ("comparison", "name"),
    ("tokens/s ratio", "tokens_per_second_ratio"),
    ("run peak RSS ratio", "run_peak_rss_ratio"),
    ("incl. scoring", "peak_rss_ratio"),
    ("train RSS ratio", "train_peak_rss_ratio"),
    ("median-step ratio", "median_step_ratio"),
    ("per CPU-s ratio", "tokens_per_cpu_second_ratio"),
    ("held-out loss delta", "eval_loss_delta"),
    ("baseline MFU", "baseline_mfu"),
    ("kubetune MFU", "kubetune_mfu"),
]


def tables(records: list[dict[str, Any]]) -> str:
    return common.tables(
        records,
        [
            ("Training throughput (side by side)", TRAIN_COLUMNS, "train"),
            ("kubetune / baseline", RATIO_COLUMNS, "train-ratio"),
            ("Levers (one change each)", LEVER_COLUMNS, "train-lever"),
        ],
    )


def main(argv=None) -> int:
    return common.bench_main(
        argv,
        section="train",
        parse_args=parse_args,
        run=run,
        tables=tables,
        run_worker=run_worker,
        also_tabulate=lambda rec: [r for r in rec.records if r["bench"] == "peak"],
    )


if __name__ == "__main__":
    raise SystemExit(main())
