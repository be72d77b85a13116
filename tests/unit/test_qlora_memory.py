"""QLoRA's memory on a CPU: the checkpoint read without a memory map, ``prepare_kbit_model`` against peft's
``prepare_model_for_kbit_training``, and weights that own their memory (no view of the checkpoint file)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from conftest import build_tiny_model, build_tiny_tokenizer

from kubetune import models
from kubetune.config import ModelConfig, QuantConfig

QUANT = QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")


def save_tiny(folder: Path, *, dtype=torch.bfloat16, shard: str | None = None) -> Path:
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, hidden=64).to(dtype)
    # generation settings that the model's config does not imply: they come only from generation_config.json
    model.generation_config.update(do_sample=True, temperature=0.3, max_new_tokens=7)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved in bf16, as real checkpoints are: loaded in bf16, its tensors could be views of the file."""
    return save_tiny(tmp_path_factory.mktemp("tiny-bf16"))


def load_mapped(folder: Path, dtype: str = "bf16"):
    """The model as transformers loads it by itself: the checkpoint memory-mapped."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=models.torch_dtype(dtype), quantization_config=models.bnb_config(QUANT), device_map="cpu"
    )


def non_quantised(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if not models._is_quantised_param(p)}


def quantised(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if models._is_quantised_param(p)}


def overwrite_tensor_data(checkpoint: Path) -> None:
    """Zero every tensor's bytes in place (same inode): a memory map of the file would see the change."""
    with open(checkpoint, "r+b") as fh:
        header_len = struct.unpack("<Q", fh.read(8))[0]
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(8 + header_len)
        fh.write(b"\0" * (size - 8 - header_len))


def lora(model):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def train_steps(model, steps: int = 3) -> list[float]:
    """AdamW steps on one fixed batch, in training mode as the Trainer runs them; the losses."""
    model.train()  # (in eval mode bitsandbytes repacks 4-bit weights for CPU inference)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------------------------------------------
# Loading without a memory map


def test_quantised_load_reads_the_checkpoint_without_mapping_it(bf16_dir):
    model = models.load_model(ModelConfig(name_or_path=str(bf16_dir)), dtype="bf16", quant=QUANT)
    assert quantised(model), "no 4-bit weights"
    assert all(p.dtype == torch.bfloat16 for p in non_quantised(model).values())
    ranges = models._file_mapped_ranges()
    assert ranges is not None
    tensors = [*model.parameters(), *model.buffers()]
    assert not [t for t in tensors if models.is_file_mapped(t, ranges)]
    assert model.name_or_path == str(bf16_dir)  # what peft records as the adapter's base


def test_unmapped_load_equals_transformers_load(bf16_dir):
    ours = models.load_model(ModelConfig(name_or_path=str(bf16_dir)), dtype="bf16", quant=QUANT)
    theirs = load_mapped(bf16_dir)
    a, b = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    assert ours.generation_config.temperature == 0.3
    assert not ours.training and ours.is_loaded_in_4bit


def test_sharded_checkpoint_loads_every_shard(tmp_path):
    folder = save_tiny(tmp_path / "sharded", shard="30KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert models._safetensors_files(folder) == sorted({folder / f for f in index["weight_map"].values()})
    ours = models.load_model(ModelConfig(name_or_path=str(folder)), dtype="bf16", quant=QUANT)
    theirs = load_mapped(folder)
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_an_index_naming_a_missing_shard_falls_back(tmp_path):
    folder = save_tiny(tmp_path / "sharded", shard="30KB")
    assert models._safetensors_files(folder) is not None
    first = sorted(folder.glob("model-*.safetensors"))[0]
    first.rename(folder / "elsewhere.bin")
    assert models._safetensors_files(folder) is None


def test_loaded_weights_survive_the_checkpoint_being_overwritten(tmp_path):
    folder = save_tiny(tmp_path / "ckpt")
    model = models.load_model(ModelConfig(name_or_path=str(folder)), dtype="bf16", quant=QUANT)
    model = models.prepare_kbit_model(model, precision="bf16", activation_checkpointing=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    overwrite_tensor_data(folder / "model.safetensors")
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed with the file: it is a view of the checkpoint"


# ------------------------------------------------------------------------------------------------------------------
# Owning the memory: the memory-mapped load, then prepare_kbit_model


def test_mapped_load_aliases_the_file_until_prepared(tmp_path):
    folder = save_tiny(tmp_path / "ckpt")
    model = load_mapped(folder)
    embed = model.get_input_embeddings().weight
    # transformers' own loader leaves bf16 weights as views of the mapped file: the file's pages stay in RSS
    assert models.is_file_mapped(embed)
    models.prepare_kbit_model(model, precision="bf16", activation_checkpointing=False)
    embed = model.get_input_embeddings().weight
    assert embed.dtype == torch.bfloat16 and not models.is_file_mapped(embed)
    ranges = models._file_mapped_ranges()
    assert not [n for n, p in model.named_parameters() if models.is_file_mapped(p, ranges)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    overwrite_tensor_data(folder / "model.safetensors")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_own_memory_copies_only_mapped_tensors(tmp_path):
    folder = save_tiny(tmp_path / "ckpt")
    model = load_mapped(folder)
    mapped = sum(
        p.numel() * p.element_size() for p in [*model.parameters(), *model.buffers()] if models.is_file_mapped(p)
    )
    assert mapped > 0
    assert models.own_memory(model) == mapped
    assert models.own_memory(model) == 0  # nothing left to copy


# ------------------------------------------------------------------------------------------------------------------
# prepare_kbit_model against peft's prepare_model_for_kbit_training


def test_bf16_precision_keeps_non_quantised_params_in_bf16_and_trains_only_lora(bf16_dir):
    model = models.load_model(ModelConfig(name_or_path=str(bf16_dir)), dtype="bf16", quant=QUANT)
    model = models.prepare_kbit_model(model, precision="bf16", activation_checkpointing=False)
    rest = non_quantised(model)
    assert rest and all(p.dtype == torch.bfloat16 for p in rest.values()), {n: p.dtype for n, p in rest.items()}
    assert not any(p.requires_grad for p in model.parameters())
    model = lora(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)[:5]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model)
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in trainable and "lora_B" in name:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        elif name not in trainable:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    rest_after = non_quantised(model.get_base_model())
    assert all(p.dtype == torch.bfloat16 for n, p in rest_after.items() if "lora_" not in n)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fp32_and_fp16_precision_upcast_as_peft_does(bf16_dir, precision):
    from peft import prepare_model_for_kbit_training

    ours = models.load_model(ModelConfig(name_or_path=str(bf16_dir)), dtype="bf16", quant=QUANT)
    ours = models.prepare_kbit_model(ours, precision=precision, activation_checkpointing=False)
    peft_model = prepare_model_for_kbit_training(load_mapped(bf16_dir), use_gradient_checkpointing=False)
    a, b = dict(ours.named_parameters()), dict(peft_model.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name].dtype, a[name].requires_grad) == (b[name].dtype, b[name].requires_grad), name
        assert torch.equal(a[name], b[name]), name
    assert all(p.dtype == torch.float32 for p in non_quantised(ours).values())


def test_fp32_load_keeps_fp32_without_a_second_copy(bf16_dir):
    model = models.load_model(ModelConfig(name_or_path=str(bf16_dir)), dtype="fp32", quant=QUANT)
    embed = model.get_input_embeddings().weight
    ptr = embed.untyped_storage().data_ptr()
    model = models.prepare_kbit_model(model, precision="fp32", activation_checkpointing=False)
    embed = model.get_input_embeddings().weight
    assert embed.dtype == torch.float32 and embed.untyped_storage().data_ptr() == ptr  # not copied again
    assert all(p.dtype == torch.float32 for p in non_quantised(model).values())
    losses = train_steps(lora(model), steps=2)
    assert all(math.isfinite(x) for x in losses)


def test_activation_checkpointing_is_enabled_as_peft_enables_it(bf16_dir):
    model = models.load_model(ModelConfig(name_or_path=str(bf16_dir)), dtype="bf16", quant=QUANT)
    model = models.prepare_kbit_model(model, precision="bf16", activation_checkpointing=True)
    assert model.is_activation_checkpointing
    ids = torch.tensor([[1, 2, 3, 4]])
    # the frozen embeddings' output requires grad, so checkpointed layers still pass gradients to the adapter
    assert model.get_input_embeddings()(ids).requires_grad
    model = lora(model)
    losses = train_steps(model, steps=2)
    assert all(math.isfinite(x) for x in losses)
    model(input_ids=ids, labels=ids).loss.backward()  # through the checkpointed layers, to every adapter
    lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_a and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_a)


def test_without_activation_checkpointing_nothing_is_hooked(bf16_dir):
    model = models.load_model(ModelConfig(name_or_path=str(bf16_dir)), dtype="bf16", quant=QUANT)
    model = models.prepare_kbit_model(model, precision="bf16", activation_checkpointing=False)
    assert not model.is_activation_checkpointing
    assert not model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad


# ------------------------------------------------------------------------------------------------------------------
# The train stage


def test_train_stage_qlora_at_bf16_keeps_the_base_in_bf16(tmp_path, bf16_dir, monkeypatch):
    from kubetune import config, sft
    from kubetune import train as train_mod
    from kubetune.pack import pack
    from kubetune.prepare import prepare

    data = tmp_path / "data.jsonl"
    rows = [{"instruction": f"what is {i} plus {i}?", "response": f"it is {2 * i}."} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = config.from_dict(
        {
            "method": "qlora",
            "model": {"name_or_path": str(bf16_dir)},
            "data": {"path": str(data), "eval_size": 2},
            "pack": {"max_length": 64},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {
                "precision": "bf16",
                "max_steps": 3,
                "batch_size": 2,
                "threads": 1,
                "learning_rate": 0.01,
                "warmup_ratio": 0.0,
                "save_steps": 10,
                "checkpoint_dir": str(tmp_path / "checkpoints"),
            },
            "output_dir": str(tmp_path),
            "tracking": {"enabled": False},
        }
    )
    packed = pack(cfg, prepare(cfg, tmp_path / "prepared"), tmp_path / "packed")
    seen: dict = {}
    real = sft.trainer_class

    def spying():
        class Spy(real()):
            def train(self, *a, **kw):
                base = self.model.get_base_model()
                seen["rest"] = {n: p.dtype for n, p in non_quantised(base).items() if "lora_" not in n}
                seen["quantised"] = len(quantised(base))
                seen["trainable"] = {n for n, p in self.model.named_parameters() if p.requires_grad}
                return super().train(*a, **kw)

        return Spy

    monkeypatch.setattr(sft, "trainer_class", spying)
    out = train_mod.train(cfg, packed, tmp_path / "adapter")
    assert seen["quantised"] > 0
    assert seen["rest"] and set(seen["rest"].values()) == {torch.bfloat16}, seen["rest"]
    assert seen["trainable"] and all("lora_" in n for n in seen["trainable"])
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["settings"]["precision"]["value"] == "bf16"
    assert all(math.isfinite(loss) for _, loss in summary["loss_curve"])


def test_8bit_loads_unmapped_and_trains(bf16_dir):
    quant8 = QuantConfig(bits=8)
    model = models.load_model(ModelConfig(name_or_path=str(bf16_dir)), dtype="bf16", quant=quant8)
    assert model.is_loaded_in_8bit and quantised(model)
    ranges = models._file_mapped_ranges()
    assert not [n for n, p in model.named_parameters() if models.is_file_mapped(p, ranges)]
    model = models.prepare_kbit_model(model, precision="bf16", activation_checkpointing=False)
    assert all(p.dtype == torch.bfloat16 for p in non_quantised(model).values())
    losses = train_steps(lora(model), steps=2)
    assert all(math.isfinite(x) for x in losses)
