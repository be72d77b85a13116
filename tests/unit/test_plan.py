"""The train stage's plan from hand-written machine facts (no model, no Trainer), the `cpu:` config section and its
deprecated flat keys, and the CPU kernels' context."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest

from kubetune import config, plan
from kubetune.config import ConfigError
from kubetune.errors import UserError
from kubetune.hardware import Decision, Hardware

SMALL_MODEL = SimpleNamespace(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, vocab_size=49152)
C3 = Hardware("cpu", frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}), cores=22, memory_bytes=88 << 30)
L4 = Hardware("cuda", cores=8, cuda_name="NVIDIA L4", cuda_bf16=True, cuda_memory_bytes=24 << 30)


def test_a_c3_node_gets_bf16_and_every_cpu_kernel():
    p = plan.make(config.from_dict({"lora": {"dropout": 0.05}}), C3, SMALL_MODEL, row_len=512)
    got = {k: d.value for k, d in p.settings().items()}
    assert got == {
        "precision": "bf16",
        "threads": 22,
        "micro_batch_size": 2,
        "activation_checkpointing": False,
        "optim": "adamw_torch_fused",
        "lm_head": "chunked",
        "dropout_sampler": "bulk",
        "lean_layers": "on",
        "split_gemms": "on",
        "allocator": got["allocator"],  # this process's malloc: see test_hardware's allocator tests
    }
    assert p.device == "cpu"
    assert all(d.reason for d in p.settings().values())
    assert "AMX" in p.precision.reason


def test_a_gpu_turns_the_cpu_kernels_off_and_takes_the_whole_batch():
    p = plan.make(config.from_dict({"train": {"batch_size": 8}, "lora": {"dropout": 0.05}}), L4, SMALL_MODEL, 512)
    assert (p.device, p.precision.value, p.micro_batch_size.value) == ("cuda", "bf16", 8)
    assert (p.lm_head.value, p.dropout_sampler.value, p.lean_layers.value, p.split_gemms.value) == (
        "trl",
        "torch",
        "off",
        "off",
    )
    assert p.allocator.value == "default"


def test_memory_facts_decide_rows_per_pass_and_checkpointing():
    tight = dataclasses.replace(C3, memory_bytes=1 << 30)
    big_model = SimpleNamespace(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, vocab_size=128256)
    p = plan.make(config.from_dict({}), tight, big_model, row_len=2048)
    assert p.micro_batch_size.value == 1 and "would need an estimated" in p.micro_batch_size.reason
    assert p.activation_checkpointing.value is True and "exceeds 80%" in p.activation_checkpointing.reason


def test_the_plan_is_frozen_printable_and_recorded_as_the_summary_shows_it():
    p = plan.make(config.from_dict({"train": {"threads": 3}}), C3, SMALL_MODEL, 256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.threads = Decision(1, "no")  # type: ignore[misc]
    lines = str(p).splitlines()
    assert len(lines) == len(p.settings()) == 10
    assert "threads = 3 (set in config (train.threads))" in lines
    assert p.to_dict()["threads"] == {"value": 3, "reason": "set in config (train.threads)"}


def test_fp16_qlora_on_a_cpu_is_refused_with_the_key():
    cfg = config.from_dict({"method": "qlora", "train": {"precision": "fp16"}, "quant": {"compute_dtype": "float16"}})
    with pytest.raises(UserError, match=r"`train\.precision`: fp16 training needs a GPU"):
        plan.make(cfg, C3, SMALL_MODEL, 128)


@pytest.mark.parametrize("key", ["lm_head", "dropout_sampler", "lean_layers", "split_gemms"])
def test_the_old_flat_train_keys_still_work_with_one_warning_naming_the_new_key(tmp_path, caplog, key):
    value = {"lm_head": "trl", "dropout_sampler": "torch", "lean_layers": "off", "split_gemms": "off"}[key]
    path = tmp_path / "old.yaml"
    path.write_text(f"train:\n  max_steps: 3\n  {key}: {value}\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="kubetune.config"):
        cfg = config.load(path)
    assert getattr(cfg.cpu, key) == value and cfg.train.max_steps == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"config key `train.{key}` is deprecated; write `cpu.{key}` instead"]
    # --set with the old key, too
    assert getattr(config.load(None, [f"train.{key}={value}"]).cpu, key) == value
    with pytest.raises(ConfigError, match=f"`train.{key}` and `cpu.{key}` are both set; keep `cpu.{key}` only"):
        config.from_dict({"train": {key: value}, "cpu": {key: value}})


def test_train_ipex_is_gone_with_a_reason(caplog):
    with pytest.raises(ConfigError, match=r"config key `train.ipex`: removed \(intel-extension-for-pytorch is end-of"):
        config.from_dict({"train": {"ipex": True}})
    with caplog.at_level(logging.WARNING, logger="kubetune.config"):
        cfg = config.from_dict({"train": {"ipex": False}})
    assert "ipex" not in cfg.to_dict()["train"]
    assert "config key `train.ipex` is no longer used" in caplog.text


def test_the_cpu_section_is_validated_like_any_other():
    with pytest.raises(ConfigError, match=r"`cpu\.lm_head`: 'fast' is not one of auto, chunked, trl"):
        config.from_dict({"cpu": {"lm_head": "fast"}})
    with pytest.raises(ConfigError, match=r"unknown config key `cpu\.lmhead`; did you mean `cpu\.lm_head`"):
        config.from_dict({"cpu": {"lmhead": "trl"}})


def test_the_kernels_context_installs_reports_and_tears_down(tiny_model_dir):
    import torch
    import transformers
    import trl.trainer.utils as trl_utils

    from kubetune import cpu
    from kubetune.cpu import lmhead

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    p = plan.make(config.from_dict({"lora": {"dropout": 0.1}}), C3, model.config, 32)
    p = dataclasses.replace(p, split_gemms=Decision("off", "test"), allocator=Decision("default", "test"))
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["q_proj"]))
    trls_head = trl_utils._ChunkedLogProbFunction
    with cpu.kernels(p) as k:
        report = k.install(peft_model, tokens_per_pass=64)
        assert report["dropout_layers"] == 2  # one q_proj per layer
        assert report["lean_layers"]["norms"] > 0
        assert trl_utils._ChunkedLogProbFunction is lmhead._EagerHead  # the CPU head, for the block
        ids = torch.randint(0, model.config.vocab_size, (1, 16))
        loss = peft_model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
    assert trl_utils._ChunkedLogProbFunction is trls_head  # TRL's own again
    assert k.report is report and "split_gemms" not in report
    assert k.allocator == Decision("default", "test")


def test_on_and_off_read_as_words_where_a_key_takes_them(tmp_path):
    """YAML reads a bare `off` as false: for an on/off key that is the word the user meant."""
    path = tmp_path / "c.yaml"
    path.write_text("cpu:\n  lean_layers: off\n  split_gemms: on\ntrain:\n  activation_checkpointing: off\n")
    cfg = config.load(path, ["cpu.lean_layers=on"])
    assert (cfg.cpu.lean_layers, cfg.cpu.split_gemms, cfg.train.activation_checkpointing) == ("on", "on", "off")
    with pytest.raises(ConfigError, match=r"`cpu\.lm_head`: expected a string, got False"):
        config.from_dict({"cpu": {"lm_head": False}})  # no on/off there
