"""Generation with base + adapter or a merged model: loading, chat formatting, batched left-padded greedy decoding."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kubetune import generation
from kubetune.artifacts import stage_output, write_json
from kubetune.config import ModelConfig
from kubetune.errors import UserError


def make_adapter(out: Path, base_dir: Path, *, perturb_seed: int | None = 0, scale: float = 0.5) -> Path:
    """An adapter folder as `kubetune train` writes it: LoRA on the tiny Llama, saved with the tokenizer and the
    JSON files of the contract. ``perturb_seed`` fills lora_B with noise (None keeps PEFT's zero init, so the
    adapter is an exact no-op)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    if perturb_seed is not None:
        gen = torch.Generator().manual_seed(perturb_seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
    tok = AutoTokenizer.from_pretrained(base_dir)
    with stage_output(out, "train", f"adapter-{perturb_seed}-{scale}-{base_dir}", inputs={}, config={}) as w:
        model.save_pretrained(w.tmp)
        tok.save_pretrained(w.tmp)
        write_json(
            w.tmp / "base_model.json",
            {
                "name_or_path": str(base_dir),
                "revision": None,
                "resolved_path": str(base_dir),
                "weights_sha256": None,
                "local": True,
            },
        )
        write_json(
            w.tmp / "training_summary.json",
            {
                "global_step": 7,
                "max_steps": 7,
                "resumed_from_step": None,
                "tokens_seen": 700,
                "train_tokens_per_second": 123.5,
                "train_seconds": 5.67,
                "peak_rss_bytes": 1 << 28,
                "loss_curve": [[1, 3.0], [2, 2.5], [7, 1.5]],
                "final_loss": 1.5,
                "settings": {},
                "method": "lora",
            },
        )
        (w.tmp / "config.yaml").write_text("method: lora\n")
    return out


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return make_adapter(tmp_path_factory.mktemp("gen") / "adapter", tiny_model_dir, perturb_seed=1)


def test_adapter_and_merged_folders_are_told_apart(adapter_dir, tmp_path):
    assert generation.is_adapter(adapter_dir)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    assert not generation.is_adapter(merged)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(adapter_dir, tiny_model_dir):
    loaded = generation.load(ModelConfig(name_or_path=str(tiny_model_dir)), adapter_dir)
    assert loaded.is_adapter and loaded.device == "cpu" and loaded.dtype == "fp32"
    tok = loaded.tokenizer
    assert tok.padding_side == "left"
    prompts = [
        generation.render_prompt(tok, [{"role": "user", "content": c}])
        for c in ["hi", "what is two plus two? tell me in one word please", "the quick brown fox", "x"]
    ]
    batched = generation.generate_texts(loaded.model, tok, prompts, max_new_tokens=12, batch_size=4)
    single = [generation.generate_texts(loaded.model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert any(batched)  # the perturbed tiny model says something
    with loaded.model.disable_adapter():
        base = generation.generate_texts(loaded.model, tok, prompts, max_new_tokens=12, batch_size=3)
    assert base != batched  # the adapter changes the answers


def test_stop_tokens_include_the_templates_end_of_turn(adapter_dir, tiny_model_dir):
    loaded = generation.load(ModelConfig(name_or_path=str(tiny_model_dir)), adapter_dir)
    tok = loaded.tokenizer
    stops = generation.stop_token_ids(tok, loaded.model)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops
    assert tok.eos_token_id in stops


def test_generation_stops_at_a_stop_token_and_drops_it(adapter_dir, tiny_model_dir):
    loaded = generation.load(ModelConfig(name_or_path=str(tiny_model_dir)), adapter_dir)
    tok = loaded.tokenizer
    prompt = generation.render_prompt(tok, [{"role": "user", "content": "hi"}])
    import torch

    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    with torch.inference_mode():
        first = int(loaded.model(input_ids=ids).logits[0, -1].argmax())  # the first greedy token
    free = generation.generate_texts(loaded.model, tok, [prompt], max_new_tokens=6, stop_ids=[])
    assert free[0]
    # Declare the first generated token a stop token: the answer must come back empty.
    assert generation.generate_texts(loaded.model, tok, [prompt], max_new_tokens=6, stop_ids=[first]) == [""]


def test_long_prompts_keep_their_last_tokens(adapter_dir, tiny_model_dir, caplog):
    loaded = generation.load(ModelConfig(name_or_path=str(tiny_model_dir)), adapter_dir)
    tok = loaded.tokenizer
    tail = generation.render_prompt(tok, [{"role": "user", "content": "the end"}])
    n_tail = len(tok(tail, add_special_tokens=False).input_ids)
    long = "filler words " * 40 + tail
    with caplog.at_level(logging.WARNING):
        cut = generation.generate_texts(loaded.model, tok, [long], max_new_tokens=8, max_prompt_tokens=n_tail)
    assert "keep only their last" in caplog.text
    # `long` ends with exactly the tokens of `tail` when the tokenizer splits at the special token boundary.
    assert tok(long, add_special_tokens=False).input_ids[-n_tail:] == tok(tail, add_special_tokens=False).input_ids
    assert cut == generation.generate_texts(loaded.model, tok, [tail], max_new_tokens=8)


def test_generate_with_merged_model_matches_adapter(adapter_dir, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = tmp_path / "merged"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(merged_dir)
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    prompts = ["hello there", "what is two plus two?"]
    via_adapter = generation.generate(cfg, adapter_dir, prompts, max_new_tokens=10)
    via_merged = generation.generate(cfg, merged_dir, prompts, max_new_tokens=10)
    assert via_adapter == via_merged
    assert len(via_adapter) == 2
    # generate() merges the adapter in memory; the unmerged PeftModel answers the same.
    loaded = generation.load(cfg, adapter_dir)
    texts = [generation.render_prompt(loaded.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    assert generation.generate_texts(loaded.model, loaded.tokenizer, texts, max_new_tokens=10) == via_adapter


def test_system_prompt_and_raw_mode_change_the_input(adapter_dir, tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    plain = generation.generate(cfg, adapter_dir, ["hi"], max_new_tokens=8)
    with_system = generation.generate(cfg, adapter_dir, ["hi"], max_new_tokens=8, system_prompt="Answer briefly.")
    raw = generation.generate(cfg, adapter_dir, ["hi"], max_new_tokens=8, raw=True)
    assert len({plain[0], with_system[0], raw[0]}) > 1
    assert generation.generate(cfg, adapter_dir, [], max_new_tokens=8) == []


def test_the_adapters_recorded_base_wins_over_the_config(adapter_dir, tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = generation.base_model_config(ModelConfig(name_or_path="some/other-model"), adapter_dir)
    assert cfg.name_or_path == str(tiny_model_dir)
    assert "trained on" in caplog.text


def test_missing_base_is_a_user_error(adapter_dir, tmp_path):
    moved = tmp_path / "adapter"
    moved.mkdir()
    ref = json.loads((adapter_dir / "base_model.json").read_text())
    ref.update(resolved_path=str(tmp_path / "gone"), name_or_path=str(tmp_path / "gone"))
    (moved / "base_model.json").write_text(json.dumps(ref))
    with pytest.raises(UserError, match="not on this machine"):
        generation.base_model_config(ModelConfig(), moved)
    (moved / "base_model.json").unlink()
    with pytest.raises(UserError, match=r"base_model\.json: not found"):
        generation.base_model_config(ModelConfig(), moved)


def test_a_tokenizer_without_chat_template_is_refused_unless_raw(tiny_base_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_model_dir)
    with pytest.raises(UserError, match="no chat template"):
        generation.render_prompt(tok, [{"role": "user", "content": "hi"}])
    answers = generation.generate(
        ModelConfig(name_or_path=str(tiny_base_model_dir)),
        tiny_base_model_dir,
        ["Once upon a time"],
        max_new_tokens=5,
        raw=True,
    )
    assert len(answers) == 1


def test_missing_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        generation.load(ModelConfig(name_or_path="x"), tmp_path / "nope")


def test_answer_gives_the_base_models_and_the_adapters_answers_from_one_load(adapter_dir, tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    prompts = ["hello there", "what is two plus two?"]
    answers = generation.answer(cfg, adapter_dir, prompts, max_new_tokens=10)
    assert [a.prompt for a in answers] == prompts
    # The base model's answers are the base folder's own (loaded as a plain model), the adapter's are generate()'s.
    assert [a.base for a in answers] == generation.generate(cfg, tiny_model_dir, prompts, max_new_tokens=10)
    assert [a.tuned for a in answers] == generation.generate(cfg, adapter_dir, prompts, max_new_tokens=10)
    assert [a.base for a in answers] != [a.tuned for a in answers]  # the perturbed adapter changes the answers
    assert all(a.base is None for a in generation.answer(cfg, adapter_dir, prompts, with_base=False, max_new_tokens=4))


def test_kubetune_generate_prints_both_answers_labelled(adapter_dir, tiny_model_dir, tmp_path, capsys):
    from kubetune import cli

    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    expected = generation.answer(cfg, adapter_dir, ["hi"], max_new_tokens=8)[0]
    argv = ["generate", "--adapter", str(adapter_dir), "-p", "hi", "--max-new-tokens", "8"]
    assert cli.main(argv) == 0

    def block(text: str) -> list[str]:
        return ["  " + line for line in (text or "(empty answer)").splitlines()]

    assert capsys.readouterr().out.splitlines() == [
        "### hi",
        "base model:",
        *block(expected.base),
        f"adapter ({adapter_dir}):",
        *block(expected.tuned),
    ]
    assert cli.main([*argv, "--no-base"]) == 0
    out = capsys.readouterr().out
    assert "base model:" not in out and f"adapter ({adapter_dir}):" in out
    # A merged model (here: the base folder itself) has no base to compare with: one labelled answer.
    assert cli.main(["generate", "--adapter", str(tiny_model_dir), "-p", "hi", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "base model:" not in out and f"merged model ({tiny_model_dir}):" in out
