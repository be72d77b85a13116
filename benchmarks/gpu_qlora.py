"""GPU: QLoRA on a 7-8B Llama, ``kubetune train`` against the classic SFTTrainer recipe, tokens/s and peak GPU memory.

    python -m benchmarks.gpu_qlora [--size 8b] [--warmup 2] [--steps 8] [--max-length 2048] [--batch 4] [--out FILE]

One prepared script for a machine with a CUDA GPU and no network (nothing is downloaded):

1. a Llama-3-8B-shaped model (hidden 4096, 32 layers, intermediate 14336, 32 heads / 8 KV heads, vocab 128256,
   untied head: 8.0B parameters) is built from a ``LlamaConfig`` with random weights directly on the GPU and saved in
   bf16 (16 GB) to the scratch folder, with a byte-level BPE tokenizer trained in-process on the synthetic text;
2. ``--rows`` synthetic instruction/response rows of varied length (seeded) are written as JSON Lines;
3. :mod:`benchmarks.train_throughput` runs the pair with ``--method qlora`` (NF4, double quantisation, bf16 compute;
   LoRA r 16 / alpha 32 / dropout 0.05 on all linear layers): the baseline is ``SFTTrainer`` with
   ``quantization_config`` and TRL's defaults (bf16, activation checkpointing, padding-free packing), kubetune is
   ``kubetune.train.train`` with its automatic settings. Each arm is its own process; peak GPU memory is
   ``torch.cuda.max_memory_allocated`` over the training phase (the quantised weights included).

Random weights are fine for speed and memory; the held-out loss is reported but says nothing about quality here.
``--size tiny --allow-cpu`` runs the same path on a toy model on a CPU (bitsandbytes' CPU kernels): a plumbing check.
About 6-8 minutes on one H100 at the defaults (most of it writing and quantising the 16 GB of weights twice).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path
from typing import Any

from benchmarks import common, train_throughput
from benchmarks.common import BenchError, Recorder, progress

SIZES: dict[str, dict[str, Any]] = {
    "8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
}
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Vocabulary of the synthetic text (its content does not matter for speed or memory).
_WORDS = (  # noqa: SIM905
    "the model data train token layer weight memory kernel batch quantise adapter rank loss gradient step "
    "pipeline cluster node pool schedule evaluate register checkpoint resume throughput latency tensor matrix "
    "vector sum product answer question explain describe compare list reason because therefore however"
).split()


def synthetic_rows(n: int, seed: int, max_words: int) -> list[dict[str, str]]:
    """Instruction/response rows of varied length (responses from 20 to ``max_words`` words), reproducible."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(k)).capitalize() + "."

    return [
        {"instruction": f"[{i}] " + text(rng.randint(8, 40)), "response": text(rng.randint(20, max_words))}
        for i in range(n)
    ]


def build_tokenizer(rows: list[dict[str, str]], vocab_size: int):
    """A byte-level BPE tokenizer trained on the rows, with a ChatML template (nothing to download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((r["instruction"] + "\n" + r["response"] for r in rows), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML
    return fast


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the random-weight model and its tokenizer in ``spec['model_dir']`` (a subprocess: frees the GPU)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    tok = build_tokenizer(rows, min(spec["config"]["vocab_size"], spec["tokenizer_vocab"]))
    config = LlamaConfig(
        **spec["config"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(spec["model_dir"])
    tok.save_pretrained(spec["model_dir"])
    return {"parameters": params}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_qlora", description=__doc__.split("\n\n")[0])
    common.common_args(p)
    p.add_argument("--size", choices=list(SIZES), default="8b")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (only sensible with --size tiny)")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--target-modules", default="all-linear")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.eval_rows = 1, 2, 4
    return args


def main(argv=None) -> int:
    if common.worker_main(argv, run_worker):
        return 0
    common.quiet_libraries()
    common.exit_on_sigterm()
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        progress("gpu_qlora: no CUDA device here; this benchmark needs a GPU (or --size tiny --allow-cpu to test it)")
        return 2
    rec = Recorder(out=args.out)
    rec.emit(common.environment())
    work = common.make_workdir(args.workdir, "gpu-qlora")
    try:
        rows = synthetic_rows(args.rows, seed=0, max_words=max(40, args.max_length))
        data = work / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        model_dir = work / f"llama-{args.size}-random"
        progress(f"gpu_qlora: building a random {args.size} Llama in {model_dir}")
        made = common.run_worker(
            "gpu_qlora",
            {"config": SIZES[args.size], "model_dir": str(model_dir), "data": str(data), "tokenizer_vocab": 4096},
            workdir=work,
            name="make-model",
            timeout_s=args.timeout,
            verbose=args.verbose,
        ).result
        rec.emit({"bench": "gpu-model", "name": f"llama-{args.size} (random weights)", **made})
        train_args = train_throughput.parse_args(
            [
                "--model", str(model_dir), "--data", str(data), "--method", "qlora",
                "--max-length", str(args.max_length), "--batch", str(args.batch),
                "--warmup", str(args.warmup), "--steps", str(args.steps), "--eval-rows", str(args.eval_rows),
                "--target-modules", args.target_modules, "--levers", "none",
                "--workdir", str(work / "train"), "--timeout", str(args.timeout),
                "--quiet-wait", str(args.quiet_wait), "--threads", str(args.threads),
                *(["--keep"] if args.keep else []), *(["--verbose"] if args.verbose else []),
            ]
        )  # fmt: skip
        records = train_throughput.run(train_args, rec)
    except BenchError as err:
        progress(f"gpu_qlora: FAILED: {err}")
        return 1
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(train_throughput.tables([dict(r) for r in records]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
