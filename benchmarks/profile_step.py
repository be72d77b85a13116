"""Where one LoRA training step's time goes: the torch profiler over one step of the model the train benchmark uses.

    python -m benchmarks.profile_step [--precision bf16|fp32] [--dropout 0.05] [--dropout-sampler bulk|torch]
                                     [--lm-head chunked|trl] [--lean-layers on|off] [--batch 2]

The step is what SFTTrainer runs for kubetune: TRL's fused LM head (``add_fused_lm_head``, as SFTTrainer adds it),
PEFT LoRA on ``--target-modules``, fused AdamW, ``--batch`` rows of ``--max-length`` tokens with restarting position
ids. ``--lm-head chunked`` (the default, what kubetune's train stage does on CPU) routes TRL's head through
:class:`kubetune.cpu.lmhead.TokenChunkedLogProb`; ``--lm-head trl`` keeps TRL's vocabulary-tiled CPU path.
``--dropout-sampler bulk`` (the default, as on CPU) draws the LoRA dropout masks with :mod:`kubetune.cpu.dropout`,
``torch`` with PEFT's ``nn.Dropout``. ``--lean-layers on`` (the default, as on CPU) routes the RMSNorm and MLP
modules through :mod:`kubetune.cpu.layers`; ``--split-gemms on`` (the default, as on CPU) times the frozen layers' GEMM
shapes and splits those that gain (:mod:`kubetune.cpu.gemm`). In bf16 the step runs under autocast with PEFT's
cast of the LoRA inputs to the fp32 adapter turned off, as the train stage runs it. Prints the
step time, the profiler's top operators by self time, and the share of the step in matmuls, attention, the LM head
and element-wise work: the numbers that say which lever can still pay and what bounds the step on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import time

from benchmarks import common

GROUPS = {
    "matmul (mm/addmm/bmm)": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::linear"),
    "attention (SDPA)": ("aten::_scaled_dot_product",),
    "log-softmax": ("aten::_log_softmax",),
    "dropout masks": ("aten::bernoulli", "aten::randint", "aten::random_"),
    "dtype copies": ("aten::copy_", "aten::to", "aten::_to_copy"),
}


def main(argv=None) -> int:
    common.quiet_libraries()
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=common.SMOLLM2)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lm-head", choices=("chunked", "trl"), default="chunked")
    p.add_argument("--dropout-sampler", choices=("bulk", "torch"), default="bulk")
    p.add_argument("--lean-layers", choices=("on", "off"), default="on")
    p.add_argument("--split-gemms", choices=("on", "off"), default="on")
    p.add_argument("--target-modules", default="q_proj,v_proj")
    p.add_argument("--batch", type=int, default=2, help="rows per pass (the train stage's CPU micro-batch: 2)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rows", type=int, default=25, help="operators listed")
    args = p.parse_args(argv)

    import torch
    import trl.trainer.utils as trl_utils
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from kubetune import hardware, models
    from kubetune.config import ModelConfig
    from kubetune.cpu import allocator, lmhead

    torch.set_num_threads(common.threads_of(args.threads))
    allocator.apply_allocator_setting(hardware.detect())  # as the train stage allocates
    path = models.resolve(ModelConfig(name_or_path=args.model)).path
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer adds
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if args.dropout_sampler == "bulk":  # what the train stage does on CPU (kubetune.cpu.dropout)
        from kubetune.cpu import dropout

        dropout.install(model)
    if args.lean_layers == "on":
        from kubetune.cpu import layers

        layers.install(model)
    if args.split_gemms == "on":  # what the train stage does on CPU (kubetune.cpu.gemm): timed per layer shape
        from kubetune.cpu import gemm

        gemm.install(model, args.batch * args.max_length)
    optim = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.max_length), generator=gen)
    pos = torch.arange(args.max_length).repeat(args.batch, 1)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            out = model(input_ids=ids, position_ids=pos, labels=ids, fused_lm_head=True)
        out.loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    # The head is installed once around every step, as the train stage installs it around trainer.train(): its
    # buffers are reused from step to step.
    head = lmhead.token_chunked_head() if args.lm_head == "chunked" else contextlib.nullcontext()
    with head, disable_input_dtype_casting(model, active=args.precision == "bf16"):
        step()  # warm-up: kernel selection, allocator, the head's buffers
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    tokens = args.batch * args.max_length
    print(
        f"\none step: {seconds:.2f} s, {tokens / seconds:.0f} tokens/s ({args.precision}, dropout {args.dropout} "
        f"({args.dropout_sampler} masks), LM head {args.lm_head}, lean layers {args.lean_layers}, {args.batch} x "
        f"{args.max_length} tokens, {torch.get_num_threads()} threads, "
        f"load avg {common.load_avg()})\n"
    )
    # Either head is one autograd Function: its forward and backward events include their matmuls and tile work.
    head_ops = ("ChunkedLogProbFunction", "TokenChunkedLogProb")
    head = [e for e in events if e.key in head_ops or e.key in tuple(f"{k}Backward" for k in head_ops)]
    shares = {g: sum(e.self_cpu_time_total for e in events if e.key.startswith(prefixes)) / total
              for g, prefixes in GROUPS.items()}  # fmt: skip
    for group, share in shares.items():
        print(f"  {group:<24} {100 * share:5.1f}% of the step's self time")
    if head:
        print(f"  {'LM head (inclusive)':<24} {100 * sum(e.cpu_time_total for e in head) / total:5.1f}% "
              "(forward + backward, its own matmuls and element-wise work included)")  # fmt: skip
    for label, fn in (("RMSNorm (lean)", "RMSNormFunction"), ("SiLU x up (lean)", "SiluMulFunction")):
        share = sum(e.cpu_time_total for e in events if e.key in (fn, f"{fn}Backward")) / total
        if share:
            print(f"  {label:<24} {100 * share:5.1f}% (forward + backward, inclusive)")
    print(f"  {'everything else':<24} {100 * (1 - sum(shares.values())):5.1f}% (element-wise, norms, optimizer)\n")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
