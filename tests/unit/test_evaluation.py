"""evaluate on the tiny Llama: losses against a hand computation, base vs adapter, task metrics, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_generation import make_adapter

from kubetune import evaluation, generation, metrics
from kubetune.artifacts import stage_output, write_json
from kubetune.config import from_dict
from kubetune.errors import UserError

MAX_NEW_TOKENS = 8

EVAL_CONVERSATIONS = [
    [{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "(replaced)"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "name a colour"},
        {"role": "assistant", "content": "blue"},
    ],
    [
        {"role": "user", "content": "Once upon a time there was"},
        {"role": "assistant", "content": "a little girl."},
        {"role": "user", "content": "what was her name?"},
        {"role": "assistant", "content": "Her name was Lily."},
    ],
    [{"role": "user", "content": "the quick brown fox"}, {"role": "assistant", "content": "jumps over the dog"}],
    [{"role": "user", "content": "0 1 2 3"}, {"role": "assistant", "content": "4 5 6 7 8 9"}],
    [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "defghijklmnopqrstuvwxyz"}],
]


def _row(i: int, messages: list[dict[str, str]]) -> dict:
    return {"id": f"id{i}", "messages": messages, "source": "eval.jsonl", "row": i + 1, "format": "messages"}


def make_prepared(out: Path, conversations: list[list[dict[str, str]]], fp: str) -> Path:
    with stage_output(out, "prepare", fp, inputs={}, config={}) as w:
        lines = [json.dumps(_row(i, m)) + "\n" for i, m in enumerate(conversations)]
        (w.tmp / "eval.jsonl").write_text("".join(lines), encoding="utf-8")
        (w.tmp / "train.jsonl").write_text("".join(lines[:2]), encoding="utf-8")
        write_json(w.tmp / "data_report.json", {"rows": len(conversations)})
        w.counts = {"train_rows": 2, "eval_rows": len(conversations)}
    return out


def tokenize(tok, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Chat template + loss on assistant tokens only, as pack does."""
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(enc["input_ids"])
    return ids, [t if m else -100 for t, m in zip(ids, enc["assistant_masks"], strict=True)]


def make_packed(
    out: Path, tokenizer_dir: Path, conversations: list[list[dict[str, str]]], fp: str, *, per_row: int = 1
) -> Path:
    """A packed_dataset folder; ``per_row`` > 1 packs several held-out examples into one row (seq_lengths)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    examples = [tokenize(tok, m) for m in conversations]
    rows: dict[str, list] = {"input_ids": [], "labels": [], "seq_lengths": []}
    for start in range(0, len(examples), per_row):
        group = examples[start : start + per_row]
        rows["input_ids"].append([t for ids, _ in group for t in ids])
        rows["labels"].append([t for _, lab in group for t in lab])
        rows["seq_lengths"].append([len(ids) for ids, _ in group])
    with stage_output(out, "pack", fp, inputs={}, config={}) as w:
        Dataset.from_dict(rows).save_to_disk(str(w.tmp / "eval"))
        Dataset.from_dict(rows).save_to_disk(str(w.tmp / "train"))
        tok.save_pretrained(w.tmp / "tokenizer")
        write_json(w.tmp / "pack_report.json", {"rows": len(rows["input_ids"])})
        w.counts = {"eval_rows": len(examples)}
    return out


def hand_loss(model, examples: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """Mean negative log-likelihood of every label token, one example at a time, in float64."""
    import torch

    total, n = 0.0, 0
    with torch.inference_mode():
        for ids, labels in examples:
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
            for t in range(1, len(ids)):
                if labels[t] != -100:
                    total -= float(logp[t - 1, labels[t]])
                    n += 1
    return total / n, n


def config(model_dir: Path, **overrides):
    data = {
        "model": {"name_or_path": str(model_dir)},
        "eval": {
            "max_rows": 5,
            "batch_size": 2,
            "num_samples": 3,
            "prompts": ["hello there"],
            "max_new_tokens": MAX_NEW_TOKENS,
        },
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    return from_dict(data)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir) -> dict:
    """Adapters (perturbed, and an exact no-op), prepared and packed folders. The first held-out answer is the
    base model's own greedy answer, so exact match has a known value."""
    root = tmp_path_factory.mktemp("eval-world")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = generation.render_prompt(tok, EVAL_CONVERSATIONS[0][:-1])
    greedy = generation.generate_texts(base, tok, [prompt], max_new_tokens=MAX_NEW_TOKENS)[0]
    assert greedy, "the tiny model should say something"
    conversations = [list(c) for c in EVAL_CONVERSATIONS]
    conversations[0] = [conversations[0][0], {"role": "assistant", "content": greedy}]
    return {
        "greedy": greedy,
        "conversations": conversations,
        "adapter": make_adapter(root / "adapter", tiny_model_dir, perturb_seed=3),
        "noop_adapter": make_adapter(root / "noop-adapter", tiny_model_dir, perturb_seed=None),
        "prepared": make_prepared(root / "prepared", conversations, "prep-fp"),
        "packed": make_packed(root / "packed", tiny_model_dir, conversations, "pack-fp"),
        "root": root,
    }


@pytest.fixture(scope="module")
def evaluated(world, tiny_model_dir) -> Path:
    cfg = config(tiny_model_dir)
    return evaluation.evaluate(cfg, world["adapter"], world["packed"], world["prepared"], world["root"] / "eval")


def read_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_losses_equal_a_hand_computation_on_the_label_tokens(world, evaluated, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = read_metrics(evaluated)
    tok = AutoTokenizer.from_pretrained(world["packed"] / "tokenizer")
    examples = [tokenize(tok, c) for c in world["conversations"][:5]]  # eval.max_rows = 5 of 6
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base_loss, n = hand_loss(base, examples)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), world["adapter"]).eval()
    adapter_loss, _ = hand_loss(adapted, examples)

    assert m["eval_rows"] == 5
    assert m["eval_tokens"] == n == sum(sum(1 for t in lab[1:] if t != -100) for _, lab in examples)
    assert m["base_eval_loss"] == pytest.approx(base_loss, rel=1e-5)
    assert m["eval_loss"] == pytest.approx(adapter_loss, rel=1e-5)
    assert abs(m["eval_loss"] - m["base_eval_loss"]) > 1e-3  # perturbed LoRA weights change the loss
    assert m["eval_loss_delta"] == pytest.approx(m["eval_loss"] - m["base_eval_loss"], abs=1e-12)
    assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-12)
    assert m["base_eval_perplexity"] == pytest.approx(math.exp(m["base_eval_loss"]), rel=1e-12)


def test_an_untouched_adapter_scores_and_answers_exactly_like_the_base(world, tiny_model_dir, tmp_path):
    out = evaluation.evaluate(
        config(tiny_model_dir), world["noop_adapter"], world["packed"], world["prepared"], tmp_path / "eval"
    )
    m = read_metrics(out)
    assert m["eval_loss"] == pytest.approx(m["base_eval_loss"], abs=1e-7)
    assert m["eval_loss_delta"] == pytest.approx(0.0, abs=1e-7)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["adapter"] for s in samples] == [s["base"] for s in samples]
    # The first reference is the base model's greedy answer: 1 exact match out of 3 held-out rows, for both.
    assert samples[0]["base"] == world["greedy"]
    assert m["base_exact_match"] == m["exact_match"] == pytest.approx(1 / 3)
    assert samples[0]["base_rouge_l"] == 1.0


def test_metrics_samples_and_manifest(world, evaluated):
    m = read_metrics(evaluated)
    for key in (
        "eval_loss",
        "base_eval_loss",
        "eval_loss_delta",
        "eval_perplexity",
        "base_eval_perplexity",
        "exact_match",
        "base_exact_match",
        "rouge_l",
        "base_rouge_l",
        "eval_rows",
        "eval_tokens",
        "generation_rows",
    ):
        assert key in m, key
    assert m["generation_rows"] == 3 and m["prompt_rows"] == 1
    samples = [json.loads(line) for line in (evaluated / "samples.jsonl").read_text().splitlines()]
    assert [s["kind"] for s in samples] == ["heldout", "heldout", "heldout", "prompt"]
    assert samples[1]["messages"] == world["conversations"][1][:-1]  # prompt = all but the final answer
    assert samples[2]["messages"][-1]["content"] == "what was her name?"
    assert samples[2]["reference"] == "Her name was Lily."
    assert samples[3]["messages"] == [{"role": "user", "content": "hello there"}]
    assert samples[3]["reference"] is None and "exact_match" not in samples[3]
    # Means over the held-out rows agree with the per-row values and with kubetune.metrics.
    held = samples[:3]
    assert m["exact_match"] == pytest.approx(sum(s["exact_match"] for s in held) / 3)
    assert m["rouge_l"] == pytest.approx(sum(metrics.rouge_l(s["adapter"], s["reference"]) for s in held) / 3)
    assert m["base_exact_match"] == pytest.approx(1 / 3)  # the base reproduces its own greedy answer
    assert samples[0]["base"] == world["greedy"]
    assert samples[0]["adapter"] != world["greedy"]
    manifest = json.loads((evaluated / "manifest.json").read_text())
    assert manifest["stage"] == "evaluate" and manifest["counts"]["eval_rows"] == 5
    assert manifest["inputs"]["prepared"]["fingerprint"] == "prep-fp"


def test_the_report_reads_well(world, evaluated):
    report = (evaluated / "eval_report.md").read_text()
    m = read_metrics(evaluated)
    assert report.startswith("# Evaluation: adapter vs base model")
    assert "| metric | base | adapter | change |" in report
    assert (
        f"| eval loss (lower is better) | {m['base_eval_loss']:.4f} | {m['eval_loss']:.4f} | "
        f"{m['eval_loss_delta']:+.4f} |" in report
    )
    assert "| exact match | 33.3% (1/3) |" in report
    assert "| ROUGE-L F1 |" in report and "| perplexity |" in report
    assert "### 1. held-out row 1 of eval.jsonl" in report
    assert "### 4. fixed prompt 1 (eval.prompts)" in report
    assert "> what was her name?" in report
    assert f"| base | {world['greedy']} | yes | 1.000 |" in report
    assert "nats per token" in report


def test_rerun_is_a_no_op_and_other_settings_refuse_without_overwrite(world, evaluated, tiny_model_dir):
    before = (evaluated / "metrics.json").stat().st_mtime_ns
    again = evaluation.evaluate(config(tiny_model_dir), world["adapter"], world["packed"], world["prepared"], evaluated)
    assert again == evaluated and (evaluated / "metrics.json").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="--overwrite"):
        evaluation.evaluate(
            config(tiny_model_dir, **{"eval.max_rows": 2}),
            world["adapter"],
            world["packed"],
            world["prepared"],
            evaluated,
        )


def test_examples_packed_several_per_row_score_the_same(world, evaluated, tiny_model_dir, tmp_path):
    packed = make_packed(tmp_path / "packed", tiny_model_dir, world["conversations"], "pack-fp-2", per_row=2)
    rows = evaluation.load_eval_examples(packed, max_rows=5)
    assert len(rows) == 5 and rows == evaluation.load_eval_examples(world["packed"], max_rows=5)
    out = evaluation.evaluate(
        config(tiny_model_dir, **{"eval.num_samples": 0, "eval.prompts": []}),
        world["adapter"],
        packed,
        world["prepared"],
        tmp_path / "eval",
    )
    m, ref = read_metrics(out), read_metrics(evaluated)
    assert m["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6)
    assert m["exact_match"] is None and m["generation_rows"] == 0
    assert "## Samples" not in (out / "eval_report.md").read_text()


def test_no_eval_rows_is_a_user_error(world, tiny_model_dir, tmp_path):
    empty = make_packed(tmp_path / "packed", tiny_model_dir, [], "pack-empty")
    with pytest.raises(UserError, match=r"data.eval_size"):
        evaluation.evaluate(config(tiny_model_dir), world["adapter"], empty, world["prepared"], tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_inputs_must_be_complete_stage_outputs(world, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="kubetune train"):
        evaluation.evaluate(
            config(tiny_model_dir), tmp_path / "missing", world["packed"], world["prepared"], tmp_path / "eval"
        )
    with pytest.raises(UserError, match="is a `prepare` output"):
        evaluation.evaluate(
            config(tiny_model_dir), world["adapter"], world["prepared"], world["prepared"], tmp_path / "eval"
        )


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("four", "four", True),
        ("  Four \n", "four", True),
        ("The  answer\tis FOUR", "the answer is four", True),
        ("four.", "four", False),
        ("The answer is four", "four", False),  # containing the reference is not a match
        ("four\nbecause 2+2=4", "four", False),  # nor is a matching first line
        ("ｆｏｕｒ", "four", True),  # NFKC folds full-width letters
    ],
)
def test_exact_match_is_strict_but_normalised(prediction, reference, expected):
    assert metrics.exact_match(prediction, reference) is expected


def test_rouge_l():
    assert metrics.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert metrics.rouge_l("dogs bark", "the cat sat") == 0.0
    assert metrics.rouge_l("running dogs", "run dog") == 1.0  # stemmed
    # LCS "the cat the mat" = 4 tokens of 6 (prediction) and 6 (reference): F1 = 4/6.
    assert metrics.rouge_l("the cat ate the mat fast", "the cat sat on the mat") == pytest.approx(4 / 6)
    assert metrics.mean_rouge_l([], []) is None and metrics.mean_exact_match([], []) is None
    assert metrics.mean_exact_match(["a", "b"], ["a", "c"]) == 0.5
    with pytest.raises(ValueError):
        metrics.mean_exact_match(["a"], [])
