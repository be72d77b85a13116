"""Memory: LoRA on a bf16 base against QLoRA (4-bit NF4, double quantisation) on a ~1B-parameter Llama.

    python -m benchmarks.memory [--quick] [--steps 2] [--seq 256] [--out FILE]

The model is built from a ``LlamaConfig`` (hidden 2048, 16 layers, intermediate 8192, 32 heads / 8 KV heads,
vocab 32000, untied head: 1.1B parameters) with random weights, saved once as safetensors in bf16 in the scratch
folder. Every arm allocates as the train stage does on a CPU unless its name says otherwise: started under tcmalloc
where it is installed, as the ``kubetune`` command starts (``kubetune.cpu.allocator.allocator_preload_env``), else
on glibc's malloc with its mmap threshold fixed at 8 MiB (``kubetune.cpu.allocator.apply``). The arms:

- ``lora-bf16``: the base in bf16 through :func:`kubetune.models.load_model`, as the train stage loads it;
- ``qlora``: exactly what the train stage does for QLoRA at precision bf16 (``train.precision=bf16``, or ``auto`` on
  a CPU with AMX): :func:`~kubetune.models.load_model` with NF4 + double quantisation, bf16 compute and the
  non-quantised parts (embeddings, LM head, norms) in bf16, then :func:`kubetune.models.prepare_kbit_model`;
- ``qlora (bitsandbytes 4-bit layers)``: ``qlora`` with bitsandbytes' own 4-bit linear forward/backward (a fresh
  dequantised weight per call) instead of :class:`kubetune.cpu.layers.Linear4bitFunction`'s reused buffer;
- ``qlora-fp32``: the same at precision fp32 (``auto`` on a CPU without AMX): the non-quantised parts in fp32;
- ``qlora-peft``: what the train stage did before ``prepare_kbit_model``, for comparison: ``from_pretrained`` as
  transformers loads it (the checkpoint memory-mapped), the non-quantised parts in fp32, then peft's
  ``prepare_model_for_kbit_training``;
- ``qlora-bf16-rest``: ``from_pretrained`` as transformers loads it, the non-quantised parts in bf16 and left as
  they are (no preparation): they stay views of the mapped checkpoint, which then stays in RSS;
- ``lora-bf16 (glibc malloc)``, ``qlora (glibc malloc)``: the first two on glibc's malloc with kubetune's 8 MiB mmap
  threshold (the train stage where tcmalloc is not installed, or with ``KUBETUNE_ALLOCATOR=system``);
- ``lora-bf16 (glibc default)``, ``qlora (glibc default)``: the first two with glibc's malloc as it comes (its
  dynamic mmap threshold);
- ``lora-bf16 +ckpt``, ``qlora +ckpt``: the first two with activation checkpointing on (each decoder layer
  recomputed in backward, as SFTTrainer's default and the train stage's ``train.activation_checkpointing: on``);
- ``lora-bf16 +malloc``, ``qlora +malloc``: ``lora-bf16`` and ``qlora`` with ``MALLOC_MMAP_THRESHOLD_=65536`` in
  the environment (glibc then serves large tensors from mmap and returns them to the kernel when freed);
- ``lora-bf16 +jemalloc``, ``qlora +jemalloc`` (only where ``libjemalloc.so.2`` is installed): with jemalloc
  preloaded and configured as the CPU images ran it before they stopped preloading it (``LD_PRELOAD``,
  ``MALLOC_CONF``).

Each arm is its own subprocess: it loads the model, wraps it with the same LoRA (r 16 on q/k/v/o and the MLP; in
bf16 on a quantised base, as SFTTrainer casts it there, else fp32 as peft creates it), sets it up as the train stage
does on a CPU (bulk dropout masks, lean norms, MLP products and 4-bit layers; TRL's fused LM head routed through
kubetune's token-chunked one; for bf16 arms the Trainer's bf16 autocast with PEFT's cast of the LoRA inputs turned
off) and runs ``--steps`` AdamW training steps on
``--batch x --seq`` random tokens (``s/step`` averages the steps after the first, which includes one-off
allocations, where there are several).
Measured: weight bytes (parameters and buffers plus bitsandbytes' quantisation state); peak RSS while loading and
preparing, during the training steps alone (VmHWM reset after loading; ``wait4`` then reports this one), and over
the whole life (the larger of the two); and, sampled every 20 ms, the peak of the anonymous part of RSS (heap and
tensors) apart from the mapped-file part (weights that ``safetensors`` maps from disk count in RSS while mapped, but
they are page cache the kernel can reclaim). For arms without checkpointing, also the bytes autograd saves for
backward in the first forward pass (the activations) and the *live* bytes: imports + weights + the adapter's
gradients and AdamW moments + those activations, what the process must hold at the end of a forward pass whatever
its allocator keeps; the ratio of live bytes bounds how low the ratio of peaks could go with a perfect allocator.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import BenchError, Recorder, progress
from kubetune import hardware
from kubetune.cpu import allocator

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


def _load(spec: dict[str, Any]):
    """The model as the arm loads it."""
    from kubetune import models
    from kubetune.config import ModelConfig, QuantConfig

    model_cfg = ModelConfig(name_or_path=spec["model_dir"])
    if spec["method"] == "lora":
        return models.load_model(model_cfg, dtype="bf16")
    quant = QuantConfig(bits=4, double_quant=True)
    if spec["loader"] == "kubetune":
        return models.load_model(model_cfg, dtype=spec["rest_dtype"], quant=quant)
    # transformers' own loading: the checkpoint memory-mapped while it is quantised
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        spec["model_dir"],
        dtype=models.torch_dtype(spec["rest_dtype"]),
        quantization_config=models.bnb_config(quant),
        device_map="cpu",
    )


def _prepare(spec: dict[str, Any], model):
    from kubetune import models

    checkpointing = bool(spec.get("checkpointing"))
    if spec["prepare"] == "kubetune":
        # As the train stage calls it (activation checkpointing off unless the arm asks for it, as the automatic
        # rule does on a CPU with memory to spare).
        return models.prepare_kbit_model(model, precision=spec["rest_dtype"], activation_checkpointing=checkpointing)
    if spec["prepare"] == "peft":
        from peft import prepare_model_for_kbit_training

        # As the train stage called it before; it casts every non-quantised parameter to fp32.
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if checkpointing:
        # As the Trainer does for a bf16 base with activation_checkpointing=True.
        models.enable_activation_checkpointing(model)
    return model


class SavedForBackward:
    """Bytes of the tensors autograd saves for backward in one forward pass (the activations), not counting
    parameters, buffers or anything that shares their storage. Each storage counts once. Under activation
    checkpointing the checkpointed layers save through hooks of their own, so the figure would miss them: the
    benchmark reports it only for arms without checkpointing."""

    def __init__(self, model):
        import torch

        self._weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self._seen: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._weights:
            self._seen.setdefault(ptr, storage.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())


def _train(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # As the train stage does before loading (a fixed glibc mmap threshold on CPU, unless the environment sets one)
    tuned = spec.get("tune_allocator")
    decision = allocator.apply_allocator_setting(hardware.detect()) if tuned else hardware.Decision("default", "")
    malloc = decision.value
    rss_imports = common.vm_hwm_bytes()
    whole = common.RssSampler().start()
    t0 = time.perf_counter()
    with allocator.trimming_heap(decision):  # as the train stage loads (where it tunes the allocator)
        model = _load(spec)
        loaded_bytes = weight_bytes(model)
        model = _prepare(spec, model)
    load_seconds = time.perf_counter() - t0
    load_hwm = common.vm_hwm_bytes()
    model.config.use_cache = False
    import trl.trainer.utils as trl_utils

    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer adds it
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    model.train()  # as the Trainer runs it (LoRA dropout on; bitsandbytes keeps its training path)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if spec["method"] == "qlora":
        # As SFTTrainer does for a quantised base (the train stage's trainer): the adapter in bf16.
        for p in trainable:
            p.data = p.data.to(torch.bfloat16)
    # As the train stage runs on a CPU: bulk dropout masks, lean norms, MLP products and 4-bit layers, and in bf16 the
    # Trainer's autocast with PEFT's cast of the LoRA inputs to the adapter's dtype turned off.
    from peft.helpers import disable_input_dtype_casting

    from kubetune.cpu import dropout, gemm, layers, lmhead

    dropout.install(model)
    lean = layers.install(model, linear4bit=spec.get("lean_4bit", True))
    gemm.install(model, spec["batch"] * spec["seq"])  # as the train stage, where frozen bf16 layers gain from a split
    bf16 = spec["rest_dtype"] == "bf16"
    train_bytes = weight_bytes(model)
    hwm_reset = common.reset_vm_hwm()
    during = common.RssSampler().start()
    optim = torch.optim.AdamW(trainable, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    step_seconds = []
    losses = []
    saved = None if spec.get("checkpointing") else SavedForBackward(model)
    # the LM head and loss as the train stage computes them on a CPU: kubetune.cpu.lmhead's token-chunked head in TRL's
    # fused head (no [tokens, vocab] logits kept; its chunk buffers reused from step to step)
    with lmhead.token_chunked_head(), disable_input_dtype_casting(model, active=bf16):
        for step in range(spec["steps"]):
            ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]), generator=gen)
            t = time.perf_counter()
            hooks = saved.hooks if step == 0 and saved is not None else contextlib.nullcontext()
            with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
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
        # AdamW keeps a gradient and two moments per trainable parameter, each in the parameter's dtype
        "trainable_state_bytes": 3 * sum(p.numel() * p.element_size() for p in trainable),
        "saved_activation_bytes": saved.bytes if saved is not None else None,
        "rss_after_imports_bytes": rss_imports,
        "load_peak_rss_bytes": load_hwm,
        "train_peak_rss_bytes": common.vm_hwm_bytes() if hwm_reset else None,
        "load_seconds": round(load_seconds, 1),
        "step_seconds": [round(s, 2) for s in step_seconds],
        "losses": losses,
        "allocator": malloc,
        "lean_layers": lean,
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    return _make_model(spec) if spec["kind"] == "make-model" else _train(spec)


# ==============================================================================================================
# Parent side

# glibc's malloc raises its mmap threshold after large frees, so later large tensors come from heaps it rarely
# returns to the kernel; a fixed threshold keeps them on mmap (freed at once). The "+malloc" arms measure that.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# jemalloc as the CPU image once preloaded it (images/Dockerfile, target cpu: installed there for an opt-in LD_PRELOAD)
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
JEMALLOC_ENV = {
    "LD_PRELOAD": JEMALLOC,
    "MALLOC_CONF": "background_thread:true,metadata_thp:auto,dirty_decay_ms:30000,muzzy_decay_ms:30000",
}
# Arms allocate as the train stage does (tune_allocator) unless named "glibc default" or given an allocator env.
LORA = {"method": "lora", "rest_dtype": "bf16", "loader": "kubetune", "prepare": None, "tune_allocator": True}
QLORA = {
    "method": "qlora",
    "rest_dtype": "bf16",
    "loader": "kubetune",
    "prepare": "kubetune",
    "reference": "lora-bf16",
    "tune_allocator": True,
}
ARMS: dict[str, dict[str, Any]] = {
    "lora-bf16": LORA,
    "qlora": QLORA,
    "lora-bf16 (glibc default)": {**LORA, "tune_allocator": False},
    "qlora (glibc default)": {**QLORA, "tune_allocator": False, "reference": "lora-bf16 (glibc default)"},
    "lora-bf16 +ckpt": {**LORA, "checkpointing": True},
    "qlora +ckpt": {**QLORA, "checkpointing": True, "reference": "lora-bf16 +ckpt"},
    "qlora (bitsandbytes 4-bit layers)": {**QLORA, "lean_4bit": False},
    "qlora-fp32": {**QLORA, "rest_dtype": "fp32"},
    "qlora-peft": {**QLORA, "rest_dtype": "fp32", "loader": "transformers", "prepare": "peft"},
    "qlora-bf16-rest": {**QLORA, "loader": "transformers", "prepare": None},
    "lora-bf16 +malloc": {**LORA, "env": MALLOC_ENV},
    "qlora +malloc": {**QLORA, "env": MALLOC_ENV, "reference": "lora-bf16 +malloc"},
}
# The train stage's allocator where tcmalloc is not installed (or KUBETUNE_ALLOCATOR=system): glibc's malloc with
# kubetune's fixed mmap threshold. The arms without an env of their own start as the `kubetune` command starts.
ARMS["lora-bf16 (glibc malloc)"] = {**LORA, "env": {}}
ARMS["qlora (glibc malloc)"] = {**QLORA, "env": {}, "reference": "lora-bf16 (glibc malloc)"}
if Path(JEMALLOC).is_file():
    ARMS["lora-bf16 +jemalloc"] = {**LORA, "env": JEMALLOC_ENV}
    ARMS["qlora +jemalloc"] = {**QLORA, "env": JEMALLOC_ENV, "reference": "lora-bf16 +jemalloc"}


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
            env = opts.pop("env", None)
            if env is None:  # as the `kubetune` command starts its training process: tcmalloc where installed
                env = (allocator.allocator_preload_env() if opts["tune_allocator"] else None) or {}
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
            # wait4's peak counts from the VmHWM reset after loading, where the kernel allows one: the whole
            # life's peak is the larger of it and the peak while loading.
            peak = max(res.peak_rss_bytes, r["load_peak_rss_bytes"] or 0)
            record = {
                "bench": "memory",
                "name": arm,
                "method": opts["method"],
                "non_quantised_dtype": opts["rest_dtype"],
                "loader": "pread" if opts["method"] == "qlora" and opts["loader"] == "kubetune" else "mmap",
                "kbit_prepare": opts["prepare"],
                "activation_checkpointing": bool(opts.get("checkpointing")),
                "lean_layers": r["lean_layers"],
                "env": _env_label(env),
                "allocator": r.get("allocator"),
                "parameters": made["parameters"],
                "trainable_parameters": r["trainable_parameters"],
                "weight_bytes": r["weight_bytes"],
                "weight_gib": common.gib(r["weight_bytes"]),
                "weight_gib_training": common.gib(r["weight_bytes_training"]),
                "peak_rss_bytes": peak,
                "peak_rss_gib": common.gib(peak),
                "load_peak_rss_gib": common.gib(r["load_peak_rss_bytes"]),
                "train_peak_rss_bytes": r["train_peak_rss_bytes"],
                "train_peak_rss_gib": common.gib(r["train_peak_rss_bytes"]),
                "peak_anon_bytes": r["peak_anon_bytes"],
                "peak_anon_gib": common.gib(r["peak_anon_bytes"]),
                "train_peak_anon_gib": common.gib(r["train_peak_anon_bytes"]),
                "peak_file_gib": common.gib(r["peak_file_bytes"]),
                "train_peak_file_gib": common.gib(r["train_peak_file_bytes"]),
                "rss_after_imports_gib": common.gib(r["rss_after_imports_bytes"]),
                "saved_activation_gib": common.gib(r["saved_activation_bytes"]),
                "live_bytes": _live_bytes(r),
                "live_gib": common.gib(_live_bytes(r)),
                "load_seconds": r["load_seconds"],
                "s_per_step": _s_per_step(r["step_seconds"]),
                "step_seconds": r["step_seconds"],
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
                        "live_bytes_ratio": _ratio(r["live_bytes"], base["live_bytes"]),
                    }
                )
            )
    finally:
        if not args.keep:
            shutil.rmtree(model_dir, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    return records


def _live_bytes(r: dict[str, Any]) -> int | None:
    """What must be resident at the end of the first forward pass whatever the allocator does: the process after
    imports, the weights (adapter included), the adapter's gradients and AdamW moments, and the activations saved
    for backward. Only where the activations were counted (arms without checkpointing)."""
    if r.get("saved_activation_bytes") is None or not r.get("rss_after_imports_bytes"):
        return None
    return (
        r["rss_after_imports_bytes"]
        + r["weight_bytes_training"]
        + r["trainable_state_bytes"]
        + r["saved_activation_bytes"]
    )


def _s_per_step(seconds: list[float]) -> float | None:
    """Mean seconds per step, without the first (one-off allocations) where there are more."""
    timed = seconds[1:] or seconds
    return round(sum(timed) / len(timed), 2) if timed else None


def _env_label(env: dict[str, str]) -> str | None:
    if env.get("LD_PRELOAD") == JEMALLOC:
        return "jemalloc (as the CPU images)"
    if allocator.PRELOADED_BY_ENV in env:
        return "tcmalloc (as kubetune starts)"
    return " ".join(f"{k}={v}" for k, v in env.items()) or None


def _ratio(a: int | None, b: int | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


MEMORY_COLUMNS = [
    ("arm", "name"),
    ("rest dtype", "non_quantised_dtype"),
    ("loader", "loader"),
    ("prepare", "kbit_prepare"),
    ("env", "env"),
    ("allocator", "allocator"),
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
    ("checkpointing", "activation_checkpointing"),
    ("saved activations GiB", "saved_activation_gib"),
    ("live GiB", "live_gib"),
    ("s/step", "s_per_step"),
    ("load avg", "load_avg"),
]
RATIO_COLUMNS = [
    ("comparison", "name"),
    ("peak RSS ratio", "peak_rss_ratio"),
    ("train peak ratio", "train_peak_rss_ratio"),
    ("peak anon ratio", "peak_anon_ratio"),
    ("weight bytes ratio", "weight_bytes_ratio"),
    ("live bytes ratio", "live_bytes_ratio"),
]


def tables(records: list[dict[str, Any]]) -> str:
    return common.tables(
        records,
        [
            ("Memory: LoRA bf16 vs QLoRA", MEMORY_COLUMNS, "memory"),
            ("QLoRA / LoRA bf16", RATIO_COLUMNS, "memory-ratio"),
        ],
    )


def main(argv=None) -> int:
    return common.bench_main(
        argv,
        section="memory",
        parse_args=parse_args,
        run=run,
        tables=tables,
        run_worker=run_worker,
    )


if __name__ == "__main__":
    raise SystemExit(main())
