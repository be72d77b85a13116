"""The GPU path on a real CUDA device: QLoRA (bitsandbytes 4-bit NF4) trains, evaluates and generates on it.

Every test here carries the `gpu` marker (from its folder) and is skipped, with the reason, where torch sees no CUDA
device; CI machines have none. Run them on a GPU machine with `make test-gpu`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune import config, evaluation, generation, hardware
from kubetune.pack import pack
from kubetune.prepare import prepare
from kubetune.train import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_world(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("gpu")
    data = root / "data.jsonl"
    rows = [{"instruction": f"what is {i} plus {i}?", "response": f"it is {2 * i}."} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = config.from_dict(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "method": "qlora",
            "data": {"path": str(data), "eval_size": 4},
            "pack": {"max_length": 64},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
            "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 0.01, "checkpoint_dir": str(root / "ckpt")},
            "eval": {"max_new_tokens": 8},
            "output_dir": str(root),
            "tracking": {"enabled": False},
        }
    )
    prepared = prepare(cfg, root / "prepared")
    packed = pack(cfg, prepared, root / "packed")
    hw = hardware.detect.func()  # the real machine, not the CPU facts the suite pins
    adapter = train(cfg, packed, root / "adapter", hw=hw)
    return {"cfg": cfg, "prepared": prepared, "packed": packed, "adapter": adapter, "hw": hw, "root": root}


def test_the_machine_is_seen_as_a_cuda_device(gpu_world):
    assert gpu_world["hw"].device == "cuda" and gpu_world["hw"].cuda_name


def test_qlora_trains_on_the_gpu_in_its_best_precision(gpu_world):
    import torch
    from safetensors.torch import load_file

    s = json.loads((gpu_world["adapter"] / "training_summary.json").read_text())
    assert s["method"] == "qlora" and s["global_step"] == 4
    want = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert s["settings"]["precision"]["value"] == want
    # the CPU kernels stay off on a GPU
    assert s["settings"]["lm_head"]["value"] == "trl" and s["settings"]["split_gemms"]["value"] == "off"
    assert all(math.isfinite(loss) for _, loss in s["loss_curve"])
    weights = load_file(str(gpu_world["adapter"] / "adapter_model.safetensors"))
    assert any("lora_B" in n and w.abs().sum() > 0 for n, w in weights.items()), "lora_B never moved from zero"


def test_the_base_model_is_4bit_nf4_on_the_gpu(tiny_model_dir):
    import bitsandbytes as bnb

    from kubetune import models

    cfg = config.from_dict({"model": {"name_or_path": str(tiny_model_dir)}, "method": "qlora"})
    model = models.load_model(cfg.model, dtype="bf16", quant=cfg.quant, device="cuda")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    assert all(m.weight.device.type == "cuda" for m in layers)


def test_evaluate_and_generate_on_the_gpu(gpu_world):
    cfg = gpu_world["cfg"]
    out = evaluation.evaluate(
        cfg, gpu_world["adapter"], gpu_world["packed"], gpu_world["prepared"], gpu_world["root"] / "eval"
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["base_eval_loss"])
    loaded = generation.load(cfg.model, gpu_world["adapter"])
    assert loaded.device.startswith("cuda")
    prompt = generation.render_prompt(loaded.tokenizer, [{"role": "user", "content": "what is 2 plus 2?"}])
    (text,) = generation.generate_texts(loaded.model, loaded.tokenizer, [prompt], max_new_tokens=8)
    assert isinstance(text, str)


def test_gpu_benchmark_script_runs_on_the_gpu(tmp_path):
    out = tmp_path / "g.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_qlora", "--size", "tiny", "--quick", "--rows", "48",
         "--max-length", "96", "--out", str(out), "--quiet-wait", "0"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    arms = {r["name"]: r for r in records if r["bench"] == "train"}
    assert set(arms) == {"baseline", "kubetune"}
    assert all(r["method"] == "qlora" and r["tokens"] > 0 for r in arms.values())
