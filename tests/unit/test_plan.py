"""The train stage's plan from hand-written machine facts (no model, no Trainer), the `cpu:` config section and its
deprecated flat keys, and the CPU kernels' context."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest

from kubetune import config, plan
from kubetune.config import ConfigError
from kubetune.distributed import World
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
        "backend": None,  # one process: no collectives
        "strategy": None,  # nor data parallelism
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
    assert len(lines) == len(p.settings()) == 12
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


# --------------------------------------------------------------------------------------------------------------
# Several processes (torchrun): the world comes from the environment, read once; the plan is made from it.


def _world(n: int, rank: int = 0, local: int | None = None, **kw) -> World:
    return World(rank=rank, world_size=n, local_rank=rank % (local or n), local_world_size=local or n, **kw)


def test_the_world_is_read_from_torchruns_environment_and_defaults_to_one_process():
    assert World.from_env({}) == World()
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    w = World.from_env({**env, "MASTER_ADDR": "trainer-node-0-0.svc", "MASTER_PORT": "29400"})
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.node_rank) == (3, 4, 1, 2, 1)
    assert (w.master_addr, w.master_port, w.is_writer, w.distributed) == ("trainer-node-0-0.svc", 29400, False, True)
    assert World.from_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}).is_writer


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE='two': expected an integer"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is not in [0, WORLD_SIZE=2)"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2"),
    ],
)
def test_a_contradictory_environment_is_one_line_naming_the_variable(env, needle):
    with pytest.raises(UserError) as err:
        World.from_env(env)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_global_batch_is_split_over_ranks_and_accumulation():
    cfg = config.from_dict({"train": {"batch_size": 16, "grad_accum": 2}})
    one = plan.make(cfg, C3, SMALL_MODEL, 512)
    four = plan.make(cfg, C3, SMALL_MODEL, 512, _world(4))
    # Rows per optimizer step = rows per pass x ranks x passes per step, the same for both.
    assert (one.rows_per_rank, one.micro_batch_size.value, one.grad_accum_steps) == (16, 2, 16)
    assert (four.rows_per_rank, four.micro_batch_size.value, four.grad_accum_steps) == (4, 2, 4)
    for p, n in ((one, 1), (four, 4)):
        assert p.micro_batch_size.value * n * p.grad_accum_steps == 16 * 2
    odd = plan.make(config.from_dict({"train": {"batch_size": 6}}), C3, SMALL_MODEL, 512, _world(2))
    assert (
        odd.micro_batch_size.value == 1 and "this rank's 3 of train.batch_size 6 is odd" in odd.micro_batch_size.reason
    )
    gpu = plan.make(config.from_dict({"train": {"batch_size": 8}}), L4, SMALL_MODEL, 512, _world(2))
    assert (gpu.micro_batch_size.value, gpu.grad_accum_steps, gpu.backend.value) == (4, 1, "nccl")


def test_threads_are_the_cores_shared_by_the_ranks_on_this_node():
    cfg = config.from_dict({"train": {"batch_size": 64}})
    assert plan.make(cfg, C3, SMALL_MODEL, 512, _world(8, local=2)).threads.value == 11
    assert plan.make(cfg, C3, SMALL_MODEL, 512, _world(8, local=1)).threads.value == 22
    many = plan.make(cfg, C3, SMALL_MODEL, 512, _world(64, local=32))
    assert many.threads.value == 1 and "shared by the 32 ranks on this node" in many.threads.reason
    pinned = config.from_dict({"train": {"threads": 3}})
    assert plan.make(pinned, C3, SMALL_MODEL, 512, _world(2)).threads.value == 3


def test_the_backend_is_gloo_on_cpu_nccl_on_cuda_or_the_configs():
    assert plan.make(config.from_dict({}), C3, SMALL_MODEL, 512, _world(2)).backend.value == "gloo"
    cfg = config.from_dict({"distributed": {"backend": "ccl"}})
    p = plan.make(cfg, C3, SMALL_MODEL, 512, _world(2, ccl_available=True))
    assert p.backend == Decision("ccl", "set in config (distributed.backend), 2 ranks")
    assert p.to_dict()["backend"]["value"] == "ccl"


@pytest.mark.parametrize(
    ("overrides", "hw", "world", "message"),
    [
        (
            {"train.batch_size": 5},
            C3,
            2,
            "config key `train.batch_size`: 5 rows (the global batch) do not split over 2 ranks; use a multiple of "
            "2, e.g. 4 or 6",
        ),
        (
            {"train.batch_size": 2},
            C3,
            4,
            "config key `train.batch_size`: 2 rows (the global batch) do not split over 4 ranks; use a multiple of "
            "4, e.g. 4",
        ),
        (
            {"train.batch_size": 8, "train.micro_batch_size": 4},
            C3,
            4,
            "config key `train.micro_batch_size`: 4 does not divide the 2 rows each of 4 ranks trains on per step "
            "(train.batch_size 8 / 4); use a divisor of 2, or 0 to choose",
        ),
        (
            {"distributed.backend": "ccl"},
            C3,
            2,
            "config key `distributed.backend`: ccl needs the `oneccl_bindings_for_pytorch` package, which is not "
            "installed (PyPI has no release of it for the pinned torch 2.13); use gloo (or auto)",
        ),
        (
            {"distributed.backend": "nccl"},
            C3,
            2,
            "config key `distributed.backend`: nccl needs CUDA devices; use gloo (or auto) on CPU",
        ),
        ({"distributed.strategy": "fsdp", "method": "qlora"}, C3, 2, plan.FSDP_QLORA_REFUSED),
        ({"distributed.strategy": "fsdp", "method": "qlora"}, L4, 1, plan.FSDP_QLORA_REFUSED),
        (
            {"distributed.strategy": "fsdp", "cpu.split_gemms": "on"},
            C3,
            2,
            f"config key `cpu.split_gemms`: on does not work under distributed.strategy fsdp ({plan.FSDP_REWRITES}); "
            "use auto or off",
        ),
        (
            {"distributed.strategy": "fsdp", "cpu.lean_layers": "on"},
            C3,
            1,
            f"config key `cpu.lean_layers`: on does not work under distributed.strategy fsdp ({plan.FSDP_REWRITES}); "
            "use auto or off",
        ),
    ],
)
def test_combinations_that_cannot_run_are_refused_with_one_line(overrides, hw, world, message):
    cfg = config.from_dict({}).replace(**overrides)
    with pytest.raises(UserError) as err:
        plan.make(cfg, hw, SMALL_MODEL, 512, _world(world))
    assert str(err.value) == message


LLAMA = SimpleNamespace(**vars(SMALL_MODEL), architectures=["LlamaForCausalLM"])


def test_fsdp_shards_the_base_by_decoder_layer_and_turns_the_cpu_layer_rewrites_off():
    fsdp = config.from_dict({"distributed": {"strategy": "fsdp"}})
    p = plan.make(fsdp, C3, LLAMA, 512, _world(4))
    assert p.strategy.value == "fsdp"
    assert p.strategy.reason == (
        "set in config (distributed.strategy), 4 ranks: the frozen base sharded over them with FSDP2 (fully_shard), "
        "one unit per decoder layer (LlamaDecoderLayer) and one for the rest (embeddings, final norm, LM head), each "
        "rank holding 1/4 of every weight; the LoRA adapter whole on every rank, only its gradients all-reduced "
        "(DDP), so checkpoints are DDP's"
    )
    assert p.to_dict()["strategy"]["value"] == "fsdp"
    off = Decision("off", f"distributed.strategy fsdp: {plan.FSDP_REWRITES}")
    assert (p.lean_layers, p.split_gemms) == (off, off)
    assert (p.lm_head.value, p.backend.value) == ("chunked", "gloo")  # the LM head and the collectives as under ddp
    # A model config whose class transformers does not know: the reason names the attribute FSDP reads.
    assert (
        "one unit per decoder layer (the model's _no_split_modules)"
        in plan.make(fsdp, C3, SMALL_MODEL, 512, _world(2)).strategy.reason
    )
    assert plan.make(fsdp, L4, LLAMA, 512, _world(2)).strategy.value == "fsdp"


def test_one_process_with_fsdp_trains_as_plain_with_the_same_kernels_as_its_ranks():
    fsdp = config.from_dict({"distributed": {"strategy": "fsdp"}})
    one = plan.make(fsdp, C3, LLAMA, 512)
    assert one.strategy == Decision(
        None, "one process: distributed.strategy fsdp has no ranks to shard over; trains as plain"
    )
    two = plan.make(fsdp, C3, LLAMA, 512, _world(2))
    assert (one.lean_layers, one.split_gemms) == (two.lean_layers, two.split_gemms)
    assert plan.make(fsdp.replace(**{"cpu.split_gemms": "off"}), C3, LLAMA, 512, _world(2)).split_gemms.value == "off"


def test_ddp_is_the_default_strategy_and_keeps_the_cpu_kernels():
    p = plan.make(config.from_dict({}), C3, LLAMA, 512, _world(2))
    assert p.strategy == Decision(
        "ddp", "2 ranks: every rank holds the whole base model, only the adapter's gradients are all-reduced (DDP)"
    )
    assert (p.lean_layers.value, p.split_gemms.value) == ("on", "on")
    assert plan.make(config.from_dict({}), C3, LLAMA, 512).strategy.value is None


def test_a_single_process_ignores_the_distributed_backend():
    cfg = config.from_dict({"distributed": {"backend": "ccl"}})
    assert plan.make(cfg, C3, SMALL_MODEL, 512).backend.value is None
