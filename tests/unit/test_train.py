"""The train stage on the tiny in-process Llama: what a step changes, QLoRA, the collator, checkpoints, resume,
merge, the training summary, DoRA / rsLoRA."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from kubetune import artifacts, config, plan, sft
from kubetune.checkpoints import COMPLETE_MARKER, FINGERPRINT_FILE, checkpoint_problem, choose_resume, mark_complete
from kubetune.errors import Preempted, UserError
from kubetune.pack import pack
from kubetune.prepare import prepare
from kubetune.sft import PackedRowsCollator, TokenCounter
from kubetune.train import train


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """train() sets torch's thread count for the process; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def base_cfg(model_dir: Path, data: Path, root: Path, **sections) -> config.Config:
    d = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data), "eval_size": 4},
        "pack": {"max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "max_steps": 4,
            "save_steps": 2,
            "batch_size": 2,
            "threads": 1,
            "learning_rate": 0.01,
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "save_total_limit": 10,
        },
        "output_dir": str(root),
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            d.setdefault(section, {}).update(values)
        else:
            d[section] = values
    return config.from_dict(d)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    """Prepared and packed data (24 short conversations) for the tiny model, built once for the module."""
    root = tmp_path_factory.mktemp("train-ws")
    data = root / "data.jsonl"
    rows = [{"instruction": f"what is {i} plus {i}?", "response": f"it is {2 * i}. " * (1 + i % 3)} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = base_cfg(tiny_model_dir, data, root)
    prepared = prepare(cfg, root / "prepared")
    packed = pack(cfg, prepared, root / "packed")
    return {"root": root, "data": data, "packed": packed, "model": tiny_model_dir}


def cfg_in(ws, tmp_path: Path, **sections) -> config.Config:
    train_kw = {"checkpoint_dir": str(tmp_path / "checkpoints"), **sections.pop("train", {})}
    return base_cfg(ws["model"], ws["data"], tmp_path, train=train_kw, **sections)


def adapter_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def summary_of(adapter: Path) -> dict:
    return json.loads((adapter / "training_summary.json").read_text())


@pytest.fixture
def spy(monkeypatch):
    """Record every parameter before and after ``trainer.train()`` and which ones were trainable."""
    seen: dict = {}
    real = sft.trainer_class

    def spying():
        base = real()

        class Spy(base):
            def train(self, *a, **kw):
                def snap():
                    return {n: p.detach().clone() for n, p in self.model.named_parameters()}

                seen["before"] = snap()
                seen["trainable"] = {n for n, p in self.model.named_parameters() if p.requires_grad}
                result = super().train(*a, **kw)
                seen["after"] = snap()
                return result

        return Spy

    monkeypatch.setattr(sft, "trainer_class", spying)
    return seen


def assert_only_adapter_changed(seen: dict) -> None:
    trainable = seen["trainable"]
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)[:5]
    for name, before in seen["before"].items():
        after = seen["after"][name]
        if name in trainable:
            if "lora_B" in name or "lora_A" in name:
                assert not torch.equal(before, after), f"{name} did not change"
        else:
            assert torch.equal(before, after), f"frozen parameter {name} changed"


# ----------------------------------------------------------------------------------------------------
# The collator


def test_collator_positions_labels_padding_and_token_count():
    counter = TokenCounter()
    collate = PackedRowsCollator(pad_token_id=0, counter=counter)
    batch = collate(
        [
            {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [2, 3]},
            {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "seq_lengths": [3]},
            {"input_ids": [4, 4], "labels": [4, 4]},  # no seq_lengths: one example
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0], [4, 4, 0, 0, 0]]
    # Position ids restart at every packed example (and the padding is a block of its own).
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # Each example's first token is masked (not predicted from the previous example); padding has no loss.
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, 9], [-100, 2, 3, -100, -100], [-100, 4, -100, -100, -100]]
    assert "attention_mask" not in batch
    # Real tokens are counted when a batch is built, and credited when the trainer trains on it.
    assert counter.collated == 10 and counter.tokens == 0 and list(counter.pending) == [10]
    counter.consume()
    assert counter.tokens == 10 and not counter.pending
    counter.consume()  # nothing pending: no change
    assert counter.tokens == 10


def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir):
    """Restarting position ids without an attention mask isolates the examples of a row (use_cache off)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.config.use_cache = False
    a, b = [5, 17, 23, 42, 8], [9, 33, 61]
    batch = PackedRowsCollator(pad_token_id=tok.pad_token_id)(
        [{"input_ids": a + b, "labels": a + b, "seq_lengths": [len(a), len(b)]}]
    )
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone_b = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
        alone_a = model(input_ids=torch.tensor([a]), use_cache=False).logits[0]
    torch.testing.assert_close(packed[len(a) :], alone_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[: len(a)], alone_a, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# What training changes


def test_lora_step_changes_only_the_adapter(workspace, tmp_path, spy):
    out = train(cfg_in(workspace, tmp_path), workspace["packed"], tmp_path / "adapter")
    assert_only_adapter_changed(spy)
    saved = adapter_tensors(out)
    assert saved and all("lora_" in k for k in saved)  # the adapter file holds no base weights
    # What was saved is what was trained.
    trained = {n: t for n, t in spy["after"].items() if n in spy["trainable"]}
    assert len(saved) == len(trained)
    for key, tensor in saved.items():
        matches = [t for n, t in trained.items() if n.replace(".default", "").endswith(key.split("model.", 1)[-1])]
        assert len(matches) == 1 and torch.equal(matches[0], tensor), key
    # The base weights on disk are the ones the adapter records.
    ref = json.loads((out / "base_model.json").read_text())
    assert ref["weights_sha256"] == artifacts.dir_digest(
        workspace["model"], ("*.safetensors", "*.bin", "*.pt", "*.pth")
    )


def test_qlora_4bit_on_cpu_trains_only_the_adapter(workspace, tmp_path, spy):
    pytest.importorskip("bitsandbytes")
    cfg = cfg_in(workspace, tmp_path, method="qlora", train={"max_steps": 3})
    out = train(cfg, workspace["packed"], tmp_path / "adapter")
    assert_only_adapter_changed(spy)
    # The frozen linear layers really were 4-bit (packed uint8 storage), not a silently unquantised model.
    assert any(t.dtype == torch.uint8 for n, t in spy["before"].items() if n not in spy["trainable"])
    summary = summary_of(out)
    assert summary["method"] == "qlora" and summary["global_step"] == 3
    # on a CPU every 4-bit projection trains through kubetune.cpu.layers.Linear4bitFunction
    packed = [n for n, t in spy["before"].items() if t.dtype == torch.uint8]
    assert summary["lean_layers"]["linear4bit"] == len(packed) > 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_training_summary_records_the_run(workspace, tmp_path):
    cfg = cfg_in(workspace, tmp_path, train={"max_steps": -1, "epochs": 1.0})
    out = train(cfg, workspace["packed"], tmp_path / "adapter")
    s = summary_of(out)
    from datasets import load_from_disk

    rows = load_from_disk(str(workspace["packed"] / "train"))
    steps = -(-len(rows) // cfg.train.batch_size)
    assert s["global_step"] == s["max_steps"] == steps
    assert s["resumed_from_step"] is None and s["resumed_from"] is None  # a fresh start is null, not 0
    assert s["steps_this_run"] == steps
    # One epoch: every real token exactly once.
    assert s["tokens_seen"] == sum(len(r) for r in rows["input_ids"])
    assert [step for step, _ in s["loss_curve"]] == list(range(1, steps + 1))
    assert s["final_loss"] == s["loss_curve"][-1][1]
    assert set(s["settings"]) == {
        "precision",
        "threads",
        "micro_batch_size",
        "activation_checkpointing",
        "optim",
        "lm_head",
        "dropout_sampler",
        "lean_layers",
        "split_gemms",
        "allocator",
        "backend",
        "strategy",
    }
    # One process: no collectives, and the figures say so.
    assert (s["world_size"], s["backend"], s["settings"]["backend"]["value"]) == (1, None, None)
    assert (s["strategy"], s["settings"]["strategy"]["value"]) == (None, None)
    assert s["tokens_per_second_per_rank"] == [s["train_tokens_per_second"]] and s["train_tokens_per_second"] > 0
    assert (s["collective_seconds_per_step"], s["allreduce_bytes_per_step"], s["allgather_bytes_per_step"]) == (
        0.0,
        0,
        0,
    )
    assert s["settings"]["lm_head"]["value"] == "chunked"  # on CPU
    # on CPU every distinct frozen layer shape was timed; whichever split won, the plans say so and why
    assert s["settings"]["split_gemms"]["value"] == "on"
    plans = s["split_gemms"]["plans"]
    assert plans and all("1" in p["forward_ms"] and str(p["forward_blocks"]) in p["forward_ms"] for p in plans.values())
    assert s["settings"]["dropout_sampler"] == {"value": "torch", "reason": "lora.dropout is 0: no masks to draw"}
    allocators = ("mmap threshold 8 MiB", "environment", "default", "tcmalloc", "jemalloc", "mimalloc")
    assert s["settings"]["allocator"]["value"] in allocators
    assert s["settings"]["threads"] == {"value": 1, "reason": "set in config (train.threads)"}
    assert s["settings"]["precision"]["value"] in ("fp32", "bf16") and s["settings"]["precision"]["reason"]
    assert s["trainable_parameters"] < s["total_parameters"] and s["peak_rss_bytes"] > 0
    assert s["train_tokens_per_second"] > 0 and s["hardware"]["device"] == "cpu"
    manifest = artifacts.read_manifest(out, "train")
    assert manifest["counts"]["global_step"] == steps and manifest["counts"]["tokens_seen"] == s["tokens_seen"]
    assert config.load(out / "config.yaml") == cfg
    # Re-running with the same inputs is a no-op.
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert train(cfg, workspace["packed"], out) == out
    assert (out / "manifest.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    ("device", "train_cfg", "dropout", "head", "sampler"),
    [
        ("cpu", {}, 0.05, "chunked", "bulk"),
        ("cuda", {}, 0.05, "trl", "torch"),
        ("cpu", {}, 0.0, "chunked", "torch"),
        ("cpu", {"lm_head": "trl", "dropout_sampler": "torch"}, 0.05, "trl", "torch"),
        ("cuda", {"lm_head": "chunked", "dropout_sampler": "bulk"}, 0.05, "chunked", "bulk"),
    ],
    ids=["cpu-auto", "gpu-auto", "no-dropout", "cpu-set", "gpu-set"],
)
def test_head_and_dropout_sampler_decisions(tmp_path, device, train_cfg, dropout, head, sampler):
    from kubetune.hardware import Hardware

    hw = Hardware(device, cores=2) if device == "cpu" else Hardware("cuda", cuda_name="L4", cuda_bf16=True)
    cfg = base_cfg(tmp_path, tmp_path, tmp_path, cpu=train_cfg, lora={"dropout": dropout})
    got_head, got_sampler = plan.choose_lm_head(cfg, hw), plan.choose_dropout_sampler(cfg, hw)
    assert (got_head.value, got_sampler.value) == (head, sampler)
    if "lm_head" in train_cfg:
        assert got_head.reason == "set in config (cpu.lm_head)"
    if "dropout_sampler" in train_cfg:
        assert got_sampler.reason == "set in config (cpu.dropout_sampler)"


@pytest.mark.parametrize("key", ["lean_layers", "split_gemms"])  # the two CPU layer rewrites, one rule
@pytest.mark.parametrize(
    ("device", "setting", "expected"),
    [("cpu", "auto", "on"), ("cuda", "auto", "off"), ("cpu", "off", "off"), ("cuda", "on", "on")],
    ids=["cpu-auto", "gpu-auto", "cpu-set", "gpu-set"],
)
def test_cpu_layer_rewrite_decisions(tmp_path, key, device, setting, expected):
    from kubetune.hardware import Hardware

    hw = Hardware(device, cores=2) if device == "cpu" else Hardware("cuda", cuda_name="L4", cuda_bf16=True)
    got = getattr(plan, f"choose_{key}")(base_cfg(tmp_path, tmp_path, tmp_path, cpu={key: setting}), hw)
    assert got.value == expected and got.reason
    if setting != "auto":
        assert got.reason == f"set in config (cpu.{key})"


@pytest.mark.parametrize(
    ("device", "train_cfg", "available_gib", "rows"),
    [
        ("cpu", {"batch_size": 4}, 16, 2),
        ("cpu", {"batch_size": 3}, 16, 1),  # 2 does not divide the batch
        ("cpu", {"batch_size": 4}, 2, 1),  # two rows' activations do not fit
        ("cpu", {"batch_size": 4, "micro_batch_size": 4}, 2, 4),
        ("cuda", {"batch_size": 8}, 16, 8),
    ],
    ids=["cpu-auto", "cpu-odd-batch", "cpu-short-of-memory", "cpu-set", "gpu-auto"],
)
def test_micro_batch_decision(tmp_path, device, train_cfg, available_gib, rows):
    from kubetune.hardware import Hardware

    gpu = Hardware("cuda", cuda_name="L4", cuda_bf16=True, cuda_memory_bytes=available_gib << 30)
    hw = Hardware(device, cores=2, memory_bytes=available_gib << 30) if device == "cpu" else gpu
    cfg = base_cfg(tmp_path, tmp_path, tmp_path, train=train_cfg)
    got = plan.choose_micro_batch(cfg, hw, activation_bytes_per_row=700 << 20, weight_bytes=300 << 20)
    assert got.value == rows and got.reason
    if "micro_batch_size" in train_cfg:
        assert got.reason == "set in config (train.micro_batch_size)"


def test_token_chunked_head_trains_like_trls_head(workspace, tmp_path):
    """The CPU LM head changes how the loss is computed, not what is learned: same losses and adapter as TRL's."""
    got = {}
    for head in ("trl", "chunked"):
        # fp32 on every CI machine (AMX would pick bf16, whose rounding differs between the two heads' GEMMs)
        cfg = cfg_in(workspace, tmp_path / head, cpu={"lm_head": head}, train={"max_steps": 3, "precision": "fp32"})
        out = train(cfg, workspace["packed"], tmp_path / head / "adapter")
        s = summary_of(out)
        assert s["settings"]["lm_head"] == {"value": head, "reason": "set in config (cpu.lm_head)"}
        got[head] = (s["loss_curve"], adapter_tensors(out))
    (trl_curve, trl_weights), (curve, weights) = got["trl"], got["chunked"]
    assert [st for st, _ in curve] == [st for st, _ in trl_curve] == [1, 2, 3]
    for (_, a), (_, b) in zip(curve, trl_curve, strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    for name, t in trl_weights.items():
        torch.testing.assert_close(weights[name], t, rtol=1e-3, atol=1e-5, msg=name)
    # and the hook is gone once training is over
    import trl.trainer.utils as trl_utils

    from kubetune.cpu.lmhead import TokenChunkedLogProb

    assert trl_utils._ChunkedLogProbFunction is not TokenChunkedLogProb


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        ({"use_dora": True}, {"use_dora": True, "use_rslora": False}),
        ({"use_rslora": True}, {"use_dora": False, "use_rslora": True}),
        ({"target_modules": ["q_proj", "v_proj"]}, {"use_dora": False, "target_modules": ["q_proj", "v_proj"]}),
    ],
    ids=["dora", "rslora", "targets"],
)
def test_adapter_config_options(workspace, tmp_path, lora, expected):
    out = train(cfg_in(workspace, tmp_path, lora=lora, train={"max_steps": 1}), workspace["packed"], tmp_path / "a")
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["r"] == 4 and written["lora_alpha"] == 8 and written["peft_type"] == "LORA"
    for key, value in expected.items():
        got = written[key]
        assert (sorted(got) if isinstance(got, list) else got) == value, key
    keys = adapter_tensors(out)
    assert any("lora_magnitude_vector" in k for k in keys) == bool(lora.get("use_dora"))
    if "target_modules" in lora:
        assert {k.split(".")[-3] for k in keys} == {"q_proj", "v_proj"}


def test_merge_writes_a_model_equal_to_base_plus_adapter(workspace, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = cfg_in(workspace, tmp_path, train={"merge": True, "max_steps": 3, "learning_rate": 0.05})
    out = train(cfg, workspace["packed"], tmp_path / "adapter")
    assert summary_of(out)["merged"] == "merged"  # relative to the adapter folder (written in a temp folder)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(workspace["model"]).eval()
    ids = torch.tensor([[1, 5, 17, 23, 42, 8, 99, 3]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        combined = PeftModel.from_pretrained(base, str(out)).eval()
        want = combined(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-4
    assert (got - base_logits).abs().max().item() > 1e-3  # the adapter did change the model
    assert (out / "merged" / "tokenizer_config.json").is_file()


# ----------------------------------------------------------------------------------------------------
# Resume


def _sigterm_at(monkeypatch, step: int):
    """Send this process a real SIGTERM when training reaches ``step`` (the stage's handler is installed)."""
    from transformers import TrainerCallback

    real = sft.callbacks

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(sft, "callbacks", lambda *a, **kw: [Kill(), *real(*a, **kw)])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sigterm_then_resume_equals_an_uninterrupted_run(workspace, tmp_path, monkeypatch, dropout):
    steps = 8
    ref = train(
        cfg_in(workspace, tmp_path / "ref", lora={"dropout": dropout}, train={"max_steps": steps}),
        workspace["packed"],
        tmp_path / "ref" / "adapter",
    )
    cfg = cfg_in(workspace, tmp_path / "run", lora={"dropout": dropout}, train={"max_steps": steps})
    ckpt_dir = Path(cfg.train.checkpoint_dir)
    with monkeypatch.context() as m:
        _sigterm_at(m, 3)
        with pytest.raises(Preempted) as err:
            train(cfg, workspace["packed"], tmp_path / "run" / "adapter")
    assert err.value.step == 3 and err.value.checkpoint == str(ckpt_dir / "checkpoint-3")
    assert "preempted at step 3" in str(err.value)
    assert checkpoint_problem(ckpt_dir / "checkpoint-3") is None
    assert not (tmp_path / "run" / "adapter").exists()  # no output until the run is finished
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the stage

    out = train(cfg, workspace["packed"], tmp_path / "run" / "adapter")
    s, r = summary_of(out), summary_of(ref)
    assert (s["resumed_from_step"], s["global_step"], s["max_steps"], s["steps_this_run"]) == (3, steps, steps, 5)
    assert s["tokens_seen"] == r["tokens_seen"]  # every trained token counted once over the two runs
    assert [st for st, _ in s["loss_curve"]] == list(range(1, steps + 1))  # the curve spans both runs
    # with dropout, the CPU's bulk mask sampler (kubetune.cpu.dropout) draws from the generator the Trainer restores
    assert s["settings"]["dropout_sampler"]["value"] == ("bulk" if dropout else "torch")
    got, want = adapter_tensors(out), adapter_tensors(ref)
    assert got.keys() == want.keys()
    for k in want:  # data order, RNG (dropout), optimizer and scheduler state all restored: bit-identical
        torch.testing.assert_close(got[k], want[k], atol=1e-7, rtol=0)


def test_resume_from_the_final_checkpoint_trains_no_extra_step(workspace, tmp_path):
    """A process killed after the last checkpoint, while writing the adapter folder: the rerun writes the same
    adapter without training (transformers alone would take one step more than max_steps)."""
    # 5 steps end inside an epoch (10 steps each); a constant rate makes any extra step visible in the weights.
    cfg = cfg_in(workspace, tmp_path, train={"max_steps": 5, "lr_scheduler": "constant"})
    first = train(cfg, workspace["packed"], tmp_path / "first")
    again = train(cfg, workspace["packed"], tmp_path / "again")
    s, f = summary_of(again), summary_of(first)
    assert (s["resumed_from_step"], s["steps_this_run"], s["global_step"], s["max_steps"]) == (5, 0, 5, 5)
    assert s["tokens_seen"] == f["tokens_seen"] and s["loss_curve"] == f["loss_curve"]
    got, want = adapter_tensors(again), adapter_tensors(first)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_explicit_checkpoint_must_be_complete_and_of_this_run(workspace, tmp_path):
    cfg = cfg_in(workspace, tmp_path)
    train(cfg, workspace["packed"], tmp_path / "adapter")
    ckpt = Path(cfg.train.checkpoint_dir) / "checkpoint-2"
    assert checkpoint_problem(ckpt) is None
    again = cfg.replace(**{"train.resume": str(ckpt)})
    out = train(again, workspace["packed"], tmp_path / "adapter2")
    assert summary_of(out)["resumed_from_step"] == 2 and summary_of(out)["resumed_from"] == str(ckpt)
    other = cfg.replace(**{"train.resume": str(ckpt), "train.learning_rate": 0.02})
    with pytest.raises(
        UserError, match=r"`train.resume`: .*checkpoint-2 cannot be resumed from: it belongs to another"
    ):
        train(other, workspace["packed"], tmp_path / "adapter3")
    (ckpt / COMPLETE_MARKER).unlink()
    with pytest.raises(UserError, match=r"cannot be resumed from: no kubetune-complete.json"):
        train(again, workspace["packed"], tmp_path / "adapter4")


def test_bad_lora_settings_are_named(workspace, tmp_path):
    with pytest.raises(UserError, match=r"`lora.target_modules`: nope_proj not found .* q_proj"):
        train(
            cfg_in(workspace, tmp_path, lora={"target_modules": ["q_proj", "nope_proj"]}),
            workspace["packed"],
            tmp_path / "a",
        )
    with pytest.raises(UserError, match=r"`lora.r`: 64 exceeds the model's hidden size 32"):
        train(cfg_in(workspace, tmp_path, lora={"r": 64}), workspace["packed"], tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------------------
# Checkpoint integrity (no model needed)

RUN = "f" * 64


def fake_checkpoint(ckpt_dir: Path, step: int, *, run_fp: str = RUN, seal: bool = True) -> Path:
    ckpt = ckpt_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(256))
    (ckpt / "optimizer.pt").write_bytes(os.urandom(512))
    if seal:
        mark_complete(ckpt, step=step, run_fp=run_fp, tokens_seen=100 * step)
    return ckpt


def test_checkpoint_problems_are_detected(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 5)
    marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
    assert marker["step"] == 5 and marker["tokens_seen"] == 500 and marker["fingerprint"] == RUN
    assert set(marker["files"]) == {"trainer_state.json", "adapter_model.safetensors", "optimizer.pt"}
    assert not list(ckpt.glob("*.part"))
    assert checkpoint_problem(ckpt, RUN) is None
    assert "another run" in checkpoint_problem(ckpt, "0" * 64)

    with open(ckpt / "optimizer.pt", "r+b") as fh:  # truncated
        fh.truncate(100)
    assert "optimizer.pt has 100 bytes, 512 were written" in checkpoint_problem(ckpt)

    ckpt = fake_checkpoint(tmp_path, 6)
    data = bytearray((ckpt / "adapter_model.safetensors").read_bytes())
    data[10] ^= 0xFF  # same size, other bytes
    (ckpt / "adapter_model.safetensors").write_bytes(bytes(data))
    assert "adapter_model.safetensors changed" in checkpoint_problem(ckpt)

    ckpt = fake_checkpoint(tmp_path, 7)
    (ckpt / "optimizer.pt").unlink()
    assert checkpoint_problem(ckpt) == "optimizer.pt is missing"

    ckpt = fake_checkpoint(tmp_path, 8, seal=False)
    assert "no kubetune-complete.json" in checkpoint_problem(ckpt)
    (ckpt / COMPLETE_MARKER).write_text('{"step": 8, "files": {"trainer_st')  # cut off mid-write
    assert "unreadable" in checkpoint_problem(ckpt)

    ckpt = fake_checkpoint(tmp_path, 9)
    (ckpt / COMPLETE_MARKER).rename(tmp_path / "m.json")
    (ckpt.parent / "checkpoint-10").mkdir()
    (tmp_path / "m.json").rename(ckpt.parent / "checkpoint-10" / COMPLETE_MARKER)
    assert "is for step 9, not 10" in checkpoint_problem(ckpt.parent / "checkpoint-10")


def test_choose_resume_skips_cut_off_and_damaged_checkpoints(tmp_path, caplog):
    cfg = config.from_dict({"train": {"resume": "auto"}})
    d = tmp_path / "checkpoints"
    for step in (5, 10, 15):
        fake_checkpoint(d, step)
    damaged = fake_checkpoint(d, 20)
    with open(damaged / "optimizer.pt", "r+b") as fh:
        fh.truncate(7)
    fake_checkpoint(d, 25, seal=False)  # killed while the Trainer was writing it
    (d / "checkpoint-30").mkdir()  # killed right after the folder was made
    with caplog.at_level("WARNING"):
        assert choose_resume(cfg.train.resume, d, RUN) == d / "checkpoint-15"
    assert sorted(p.name for p in d.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-15", "checkpoint-5"]
    text = caplog.text
    assert "checkpoint-25 is incomplete" in text and "checkpoint-30 is incomplete" in text
    assert "checkpoint-20 is damaged (optimizer.pt has 7 bytes" in text
    assert json.loads((d / FINGERPRINT_FILE).read_text()) == {"fingerprint": RUN}

    # Checkpoints of another run are refused, never deleted or loaded.
    with pytest.raises(UserError, match="holds checkpoints of a different run"):
        choose_resume(cfg.train.resume, d, "0" * 64)
    assert len(list(d.glob("checkpoint-*"))) == 3
    # ... even when the folder's run file is missing: each marker names its run.
    (d / FINGERPRINT_FILE).unlink()
    with pytest.raises(UserError, match="holds checkpoints of a different run"):
        choose_resume(cfg.train.resume, d, "0" * 64)
    # `never` starts fresh and clears the folder.
    assert choose_resume(config.from_dict({"train": {"resume": "never"}}).train.resume, d, "0" * 64) is None
    assert not list(d.glob("checkpoint-*"))
    # An empty folder: start fresh.
    assert choose_resume(cfg.train.resume, tmp_path / "new", RUN) is None


def test_bf16_training_feeds_lora_layers_bf16_inputs(workspace, tmp_path, monkeypatch):
    """Under bf16 autocast the LoRA inputs stay bf16 (PEFT's cast to the fp32 adapter is off for the run), the
    adapter itself stays fp32, the lean layers are installed, and training still learns."""
    from transformers import TrainerCallback

    seen: set[torch.dtype] = set()

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            for name, module in model.named_modules():
                if name.endswith("lora_A.default"):
                    assert module.weight.dtype == torch.float32
                    module.register_forward_pre_hook(lambda mod, inputs: seen.add(inputs[0].dtype))

    make_callbacks = sft.callbacks
    monkeypatch.setattr(sft, "callbacks", lambda *a, **k: [*make_callbacks(*a, **k), Watch()])
    cfg = cfg_in(workspace, tmp_path, train={"precision": "bf16", "max_steps": 3}, lora={"dropout": 0.1})
    s = summary_of(train(cfg, workspace["packed"], tmp_path / "adapter"))
    assert s["settings"]["precision"]["value"] == "bf16"
    assert s["settings"]["lean_layers"]["value"] == "on"
    assert seen == {torch.bfloat16}
    losses = [loss for _, loss in s["loss_curve"]]
    assert all(math.isfinite(x) for x in losses)
