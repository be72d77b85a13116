"""The pack stage: templates, loss masks, truncation, best-fit-decreasing packing, isolation, TRL collator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CHATML_TEMPLATE, build_tiny_model, build_tiny_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune import config, templates
from kubetune.artifacts import fingerprint, read_manifest, stage_output
from kubetune.errors import UserError
from kubetune.pack import best_fit_decreasing, num_proc, pack, span_mask

# SmolLM2-Instruct's template: ChatML without generation markers, and a default system prompt.
CHATML_NO_MARKERS = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A template whose generation prompt differs from how a finished assistant turn opens (like reasoning models
# that prime an empty thinking block): prefix rendering is inconsistent, so spans are found by search.
CHATML_PRIMED = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\nAnswer: ' }}{% endif %}"
)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep the datasets cache (tokenisation results) inside the test's tmp folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def conv(messages: list[tuple[str, str]], i: int) -> dict:
    msgs = [{"role": r, "content": c} for r, c in messages]
    return {
        "id": fingerprint(msgs)[:16],
        "messages": msgs,
        "source": "data.jsonl",
        "row": i + 1,
        "format": "messages",
    }


def qa(i: int, q_words: int = 3, a_words: int = 2) -> dict:
    return conv(
        [
            ("user", " ".join(["what is two plus two?"] * q_words) + f" #{i}"),
            ("assistant", " ".join(["four."] * a_words) + f" ({i})"),
        ],
        i,
    )


def make_prepared(root: Path, train: list[dict], eval_rows: list[dict] | None = None, name: str = "prepared") -> Path:
    out = root / name
    with stage_output(out, "prepare", fingerprint(train, eval_rows), inputs={}, config={}) as w:
        (w.tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
        (w.tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows or []), encoding="utf-8")
    return out


def cfg_for(model_dir: Path | str, **pack_kw) -> config.Config:
    return config.from_dict({"model": {"name_or_path": str(model_dir)}, "pack": {"max_length": 256, **pack_kw}})


def load(packed: Path, split: str):
    from datasets import load_from_disk

    return load_from_disk(str(packed / split))


def loss_runs(row: dict) -> list[list[int]]:
    """Token ids of each contiguous run of labels that carry loss."""
    runs, cur = [], []
    for tok_id, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != -100:
            assert label == tok_id
            cur.append(tok_id)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def examples_of(row: dict) -> list[tuple[list[int], list[int]]]:
    out, start = [], 0
    for n in row["seq_lengths"]:
        out.append((row["input_ids"][start : start + n], row["labels"][start : start + n]))
        start += n
    assert start == len(row["input_ids"])
    return out


def chat_ids(tok, messages: list[dict]) -> list[int]:
    return tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def model_dir_with(tmp_path: Path, chat_template: str | None) -> Path:
    d = tmp_path / "model"
    tok = build_tiny_tokenizer(chat_template=chat_template)
    build_tiny_model(tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


MULTI_TURN = [
    ("system", "Be brief."),
    ("user", "what is two plus two?"),
    ("assistant", "four."),
    ("user", "and 3 + 3?"),
    ("assistant", "six, the answer is six."),
]


# ----------------------------------------------------------------------------------------------------
# Templates and masks


@pytest.mark.parametrize(
    "name,expected",
    [
        (
            "qa",
            "<s>Be brief.\n\nQuestion: what is two plus two?\n\nAnswer: four.</s>\n\nQuestion: and 3 + 3?\n\n"
            "Answer: six, the answer is six.</s>",
        ),
        (
            "chatml",
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nwhat is two plus two?<|im_end|>\n"
            "<|im_start|>assistant\nfour.<|im_end|></s>\n<|im_start|>user\nand 3 + 3?<|im_end|>\n"
            "<|im_start|>assistant\nsix, the answer is six.<|im_end|></s>\n",
        ),
    ],
)
def test_fallback_templates_render_and_mark_assistant_tokens(name, expected):
    tok = build_tiny_tokenizer(chat_template=templates.fallback_template(name))
    msgs = [{"role": r, "content": c} for r, c in MULTI_TURN]
    assert tok.apply_chat_template(msgs, tokenize=False) == expected
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert expected.startswith(prompt) and prompt.endswith("Answer:" if name == "qa" else "assistant\n")
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    runs = loss_runs(
        {
            "input_ids": out["input_ids"],
            "labels": [t if m else -100 for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True)],
        }
    )
    end = "</s>" if name == "qa" else "<|im_end|></s>"
    lead = " " if name == "qa" else ""
    assert [tok.decode(r) for r in runs] == [f"{lead}four.{end}", f"{lead}six, the answer is six.{end}"]


def test_span_mask_marks_every_token_overlapping_a_span():
    offsets = np.array([[0, 2], [2, 5], [5, 6], [6, 9], [9, 9], [9, 12]])
    assert span_mask(offsets, [(3, 6)]).tolist() == [False, True, True, False, False, False]
    assert span_mask(offsets, [(0, 1), (9, 12)]).tolist() == [True, False, False, False, False, True]
    assert span_mask(offsets, []).tolist() == [False] * 6


def test_marker_template_masks_are_exact_and_match_transformers(tmp_path, tiny_model_dir):
    rows = [conv(MULTI_TURN, 0), qa(1), conv([("user", "hi"), ("assistant", "hello there")], 2)]
    prepared = make_prepared(tmp_path, rows, rows)
    packed = pack(cfg_for(tiny_model_dir), prepared, tmp_path / "packed")
    tok = build_tiny_tokenizer()
    ev = load(packed, "eval")
    assert len(ev) == 3
    for row, src in zip(ev, rows, strict=True):
        assistant = [m["content"] for m in src["messages"] if m["role"] == "assistant"]
        assert [tok.decode(r) for r in loss_runs(row)] == [a + "<|im_end|>" for a in assistant]
        # the mask transformers computes from the generation markers (minus the first token: never a label)
        ref = tok.apply_chat_template(
            src["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert row["input_ids"] == ref["input_ids"]
        expected = [t if m else -100 for t, m in zip(ref["input_ids"], ref["assistant_masks"], strict=True)]
        expected[0] = -100
        assert row["labels"] == expected
        assert row["seq_lengths"] == [len(row["input_ids"])]


def test_template_without_markers_gives_the_same_masks_by_prefix_rendering(tmp_path):
    rows = [conv(MULTI_TURN, 0), conv(MULTI_TURN[1:], 1), qa(2)]
    marked = pack(
        cfg_for(model_dir_with(tmp_path / "a", CHATML_TEMPLATE)),
        make_prepared(tmp_path, rows, rows),
        tmp_path / "marked",
    )
    plain_dir = model_dir_with(
        tmp_path / "b", CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    )
    plain = pack(cfg_for(plain_dir), tmp_path / "prepared", tmp_path / "plain")
    assert load(plain, "eval")[:] == load(marked, "eval")[:]
    report = json.loads((plain / "pack_report.json").read_text())
    assert report["template"]["mask_method"] == "prefix rendering"
    assert report["template"]["source"] == "model"


@pytest.mark.parametrize("template", [CHATML_NO_MARKERS, CHATML_PRIMED], ids=["smollm2-style", "primed-prompt"])
def test_real_style_templates_mask_assistant_text_and_end_token(tmp_path, template):
    rows = [conv(MULTI_TURN, 0), conv([("user", "hi"), ("assistant", " padded answer \n")], 1), qa(2)]
    packed = pack(cfg_for(model_dir_with(tmp_path, template)), make_prepared(tmp_path, rows, rows), tmp_path / "packed")
    tok = build_tiny_tokenizer(chat_template=template)
    for row, src in zip(load(packed, "eval"), rows, strict=True):
        assistant = [m["content"] for m in src["messages"] if m["role"] == "assistant"]
        expected = [a + "<|im_end|>" for a in assistant]
        if template is CHATML_PRIMED:  # that template trims content
            expected = [a.strip() + "<|im_end|>" for a in assistant]
        assert [tok.decode(r) for r in loss_runs(row)] == expected
        assert tok.decode(row["input_ids"]) == tok.apply_chat_template(src["messages"], tokenize=False)


def test_base_model_gets_the_qa_fallback_and_the_saved_tokenizer_carries_it(tmp_path, tiny_base_model_dir):
    from transformers import AutoTokenizer

    rows = [conv(MULTI_TURN, 0), qa(1)]
    packed = pack(cfg_for(tiny_base_model_dir), make_prepared(tmp_path, rows, rows), tmp_path / "packed")
    tok = AutoTokenizer.from_pretrained(packed / "tokenizer")
    assert tok.chat_template == templates.fallback_template("qa")
    ev = load(packed, "eval")
    assert tok.decode(ev[0]["input_ids"]).startswith("<s>Be brief.\n\nQuestion: what is two plus two?\n\nAnswer:")
    assert [tok.decode(r) for r in loss_runs(ev[0])] == [" four.</s>", " six, the answer is six.</s>"]
    report = json.loads((packed / "pack_report.json").read_text())
    assert report["template"] | {"sha256": None} == {
        "source": "fallback",
        "name": "qa",
        "description": "fallback `qa`",
        "has_generation_markers": True,
        "mask_method": "{% generation %} markers",
        "sha256": None,
    }
    assert "fallback `qa`" in (packed / "pack_report.md").read_text()


def test_chatml_fallback_and_config_override(tmp_path, tiny_base_model_dir, tiny_model_dir):
    rows = [qa(0), qa(1)]
    prepared = make_prepared(tmp_path, rows, rows)
    packed = pack(cfg_for(tiny_base_model_dir, fallback_template="chatml"), prepared, tmp_path / "chatml")
    tok = build_tiny_tokenizer()
    assert [tok.decode(r) for r in loss_runs(load(packed, "eval")[0])] == ["four. four. (0)<|im_end|></s>"]
    # an override replaces even a model's own template
    cfg = config.from_dict(
        {"model": {"name_or_path": str(tiny_model_dir), "chat_template": templates.fallback_template("qa")}}
    )
    over = pack(cfg, prepared, tmp_path / "override")
    report = json.loads((over / "pack_report.json").read_text())
    assert report["template"]["source"] == "config"
    assert [tok.decode(r) for r in loss_runs(load(over, "eval")[1])] == [" four. four. (1)</s>"]


def test_loss_on_all_labels_every_token_but_each_example_start(tmp_path, tiny_model_dir):
    rows = [qa(i) for i in range(6)]
    packed = pack(cfg_for(tiny_model_dir, loss_on="all"), make_prepared(tmp_path, rows, rows), tmp_path / "p")
    for split in ("train", "eval"):
        for row in load(packed, split):
            for ids, labels in examples_of(row):
                assert labels == [-100, *ids[1:]]
    report = json.loads((packed / "pack_report.json").read_text())
    train = report["train"]
    assert train["loss_tokens"] == train["tokens"] - train["examples_out"]


def test_assistant_loss_fraction_and_length_report(tmp_path, tiny_model_dir):
    rows = [qa(i, q_words=1 + i % 3, a_words=1 + i % 4) for i in range(20)]
    packed = pack(cfg_for(tiny_model_dir), make_prepared(tmp_path, rows), tmp_path / "p")
    tok = build_tiny_tokenizer()
    lengths = np.array([len(chat_ids(tok, r["messages"])) for r in rows])
    report = json.loads((packed / "pack_report.json").read_text())
    tr = report["train"]
    assert tr["length_tokens"]["min"] == lengths.min() and tr["length_tokens"]["max"] == lengths.max()
    assert tr["length_tokens"]["p50"] == int(np.percentile(lengths, 50, method="nearest"))
    assert tr["tokens"] == lengths.sum() == tr["tokens_in"]
    ds = load(packed, "train")
    loss = sum(sum(label != -100 for label in r["labels"]) for r in ds)
    assert tr["loss_tokens"] == loss and tr["loss_token_fraction"] == round(loss / lengths.sum(), 4)
    assert tr["packing_efficiency"] == round(lengths.sum() / (len(ds) * 256), 4)
    assert report["eval"]["rows"] == 0 and report["eval"]["examples_in"] == 0
    manifest = read_manifest(packed, "pack")
    assert manifest["counts"]["train_rows"] == len(ds) and manifest["counts"]["train_examples"] == 20


# ----------------------------------------------------------------------------------------------------
# Truncation


def long_and_short(tmp_path: Path) -> tuple[Path, list[dict]]:
    rows = [qa(0), qa(1, q_words=2, a_words=40), qa(2), qa(3, q_words=40, a_words=1), qa(4, a_words=30)]
    return make_prepared(tmp_path, rows, [qa(5, a_words=40)]), rows


def test_truncate_keeps_the_start_and_counts(tmp_path, tiny_model_dir):
    prepared, rows = long_and_short(tmp_path)
    packed = pack(cfg_for(tiny_model_dir, max_length=96), prepared, tmp_path / "p")
    report = json.loads((packed / "pack_report.json").read_text())
    tr = report["train"]
    # data rows 2 and 5 lose the end of their answers; row 4's prompt alone fills the 96 tokens: it is cut
    # too, has no loss token left, and is dropped
    assert tr["truncated"]["count"] == 3
    assert {e["row"] for e in tr["truncated"]["examples"]} == {2, 4, 5}
    assert tr["dropped_no_loss"]["count"] == 1 and tr["dropped_no_loss"]["examples"][0]["row"] == 4
    assert tr["examples_out"] == 4 and report["eval"]["truncated"]["count"] == 1
    tok = build_tiny_tokenizer()
    seqs = [ex for row in load(packed, "train") for ex in examples_of(row)]
    assert len(seqs) == 4 and all(len(ids) <= 96 for ids, _ in seqs)
    full = chat_ids(tok, rows[1]["messages"])
    assert any(ids == full[:96] for ids, _ in seqs)
    assert all(len(r["input_ids"]) <= 96 for r in load(packed, "train"))


def test_drop_policy_lists_the_dropped_ids(tmp_path, tiny_model_dir):
    prepared, rows = long_and_short(tmp_path)
    packed = pack(cfg_for(tiny_model_dir, max_length=96, truncation="drop"), prepared, tmp_path / "p")
    tr = json.loads((packed / "pack_report.json").read_text())["train"]
    assert tr["truncated"]["count"] == 0
    assert sorted(e["id"] for e in tr["dropped_too_long"]["examples"]) == sorted(rows[i]["id"] for i in (1, 3, 4))
    assert tr["examples_out"] == 2 and sum(len(r["seq_lengths"]) for r in load(packed, "train")) == 2
    assert read_manifest(packed, "pack")["counts"]["dropped"] == 4  # 3 train + the long eval example
    assert "dropped (too long)" in (packed / "pack_report.md").read_text()


def test_error_policy_names_the_first_offending_example(tmp_path, tiny_model_dir):
    prepared, _ = long_and_short(tmp_path)
    with pytest.raises(UserError, match=r"data\.jsonl row 2: \d+ tokens > pack\.max_length=96 \(3 examples"):
        pack(cfg_for(tiny_model_dir, max_length=96, truncation="error"), prepared, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_all_examples_unusable_is_a_user_error(tmp_path, tiny_model_dir):
    rows = [qa(i, q_words=30) for i in range(3)]
    prepared = make_prepared(tmp_path, rows)
    with pytest.raises(UserError, match=r"all 3 examples are longer than pack\.max_length=32"):
        pack(cfg_for(tiny_model_dir, max_length=32, truncation="drop"), prepared, tmp_path / "p")
    with pytest.raises(UserError, match=r"none of the 3 examples carries loss within pack\.max_length=32"):
        pack(cfg_for(tiny_model_dir, max_length=32), prepared, tmp_path / "p")
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------------------------------
# Packing


def reference_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook O(n * bins) best fit decreasing, with the same tie rules."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
        else:
            b = len(bins)
            bins.append([])
            room.append(capacity)
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64).flatmap(lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=80))))
def test_best_fit_decreasing_matches_the_reference(case):
    capacity, lengths = case
    bins = best_fit_decreasing(lengths, capacity)
    assert bins == reference_bfd(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


def test_best_fit_decreasing_rejects_impossible_lengths():
    with pytest.raises(ValueError):
        best_fit_decreasing([3, 9], 8)


def test_packed_rows_hold_every_example_once_and_are_deterministic(tmp_path, tiny_model_dir):
    rows = [qa(i, q_words=1 + i % 3, a_words=1 + (i * 7) % 5) for i in range(40)]
    prepared = make_prepared(tmp_path, rows)
    cfg = cfg_for(tiny_model_dir, max_length=128)
    a = load(pack(cfg, prepared, tmp_path / "a"), "train")
    b = load(pack(cfg, prepared, tmp_path / "b"), "train")
    assert a[:] == b[:]
    tok = build_tiny_tokenizer()
    expected = sorted(tuple(chat_ids(tok, r["messages"])) for r in rows)
    seqs = [ex for row in a for ex in examples_of(row)]
    assert sorted(tuple(ids) for ids, _ in seqs) == expected
    assert all(sum(r["seq_lengths"]) == len(r["input_ids"]) == len(r["labels"]) <= 128 for r in a)
    assert len(a) == len(reference_bfd([len(s) for s in expected], 128)) < len(rows) / 2
    unpacked = load(pack(cfg_for(tiny_model_dir, max_length=128, packing=False), prepared, tmp_path / "c"), "train")
    assert [tuple(r["input_ids"]) for r in unpacked] == [tuple(chat_ids(tok, r["messages"])) for r in rows]
    assert all(len(r["seq_lengths"]) == 1 for r in unpacked)


def test_packed_examples_do_not_attend_to_each_other(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [qa(i, q_words=1 + i % 3, a_words=1 + i % 4) for i in range(12)]
    ds = load(pack(cfg_for(tiny_model_dir, max_length=200), make_prepared(tmp_path, rows), tmp_path / "p"), "train")
    row = max(ds, key=lambda r: len(r["seq_lengths"]))
    assert len(row["seq_lengths"]) >= 3
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    (position_ids,) = DataCollatorForLanguageModeling.get_position_ids_from_packed_seq_lengths([row["seq_lengths"]])
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([row["input_ids"]]), position_ids=position_ids[None], use_cache=False
        ).logits[0]
        alone = torch.cat(
            [model(input_ids=torch.tensor([ids]), use_cache=False).logits[0] for ids, _ in examples_of(row)]
        )
    assert packed.shape == alone.shape
    assert torch.allclose(packed, alone, atol=1e-4), (packed - alone).abs().max()


def test_trl_padding_free_collator_consumes_the_packed_rows(tmp_path, tiny_model_dir):
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [qa(i, a_words=1 + i % 3) for i in range(10)]
    ds = load(pack(cfg_for(tiny_model_dir, max_length=160), make_prepared(tmp_path, rows), tmp_path / "p"), "train")
    tok = build_tiny_tokenizer()
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)([ds[0], ds[1]])
    assert {"input_ids", "labels", "position_ids", "cu_seq_lens_q"} <= set(batch)
    assert "attention_mask" not in batch
    lens = ds[0]["seq_lengths"] + ds[1]["seq_lengths"]
    assert batch["input_ids"].shape == (1, sum(lens))
    assert batch["position_ids"][0].tolist() == [p for n in lens for p in range(n)]
    assert batch["cu_seq_lens_q"].tolist() == np.concatenate([[0], np.cumsum(lens)]).tolist()
    assert torch.equal(batch["labels"][0], torch.tensor(ds[0]["labels"] + ds[1]["labels"]))


# ----------------------------------------------------------------------------------------------------
# Re-runs, processes, bad input


def test_rerun_is_a_no_op_and_a_changed_config_refuses(tmp_path, tiny_model_dir):
    prepared = make_prepared(tmp_path, [qa(i) for i in range(4)])
    out = pack(cfg_for(tiny_model_dir), prepared, tmp_path / "p")
    created = read_manifest(out, "pack")["created_at"]
    (out / "marker").write_text("kept")
    pack(cfg_for(tiny_model_dir, num_proc=3), prepared, out)  # num_proc changes nothing in the output
    assert (out / "marker").exists() and read_manifest(out, "pack")["created_at"] == created
    with pytest.raises(UserError, match="pass --overwrite"):
        pack(cfg_for(tiny_model_dir, max_length=128), prepared, out)
    pack(cfg_for(tiny_model_dir, max_length=128), prepared, out, overwrite=True)
    assert not (out / "marker").exists()
    assert read_manifest(out, "pack")["config"]["pack"]["max_length"] == 128


def test_worker_processes_give_the_same_output(tmp_path, tiny_model_dir, monkeypatch, caplog):
    import datasets

    rows = [qa(i, q_words=1 + i % 3, a_words=1 + i % 5) for i in range(60)]
    prepared = make_prepared(tmp_path, rows, rows[:7])
    caplog.set_level("INFO", logger="kubetune.pack")
    two = pack(cfg_for(tiny_model_dir, num_proc=2), prepared, tmp_path / "two")
    assert "train.jsonl: 60 examples, 2 processes" in caplog.text
    # a separate cache, so the single-process run tokenises again instead of reading the workers' results
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "other-cache")
    one = pack(cfg_for(tiny_model_dir, num_proc=1), prepared, tmp_path / "one")
    for split in ("train", "eval"):
        assert load(one, split)[:] == load(two, split)[:]


def test_tokenisation_is_cached_in_the_datasets_cache(tmp_path, tiny_model_dir):
    prepared = make_prepared(tmp_path, [qa(i) for i in range(8)], [qa(9)])
    cache = tmp_path / "hf-datasets-cache"

    def cached() -> set[Path]:
        return set(cache.rglob("cache-*.arrow"))

    pack(cfg_for(tiny_model_dir), prepared, tmp_path / "a")
    first = cached()
    assert len(first) == 2  # train and eval
    # packing, max_length and truncation act after tokenisation: the cached tokens are reused
    pack(cfg_for(tiny_model_dir, packing=False, max_length=64, truncation="drop"), prepared, tmp_path / "b")
    assert cached() == first
    pack(cfg_for(tiny_model_dir, loss_on="all"), prepared, tmp_path / "c")
    assert len(cached()) == 4


def test_num_proc_choice():
    assert num_proc(0, 100) == 1  # tiny data: process start-up would dominate
    assert num_proc(3, 100) == 3 and num_proc(8, 2) == 2
    assert 1 <= num_proc(0, 10**7) <= 16


def test_empty_eval_split_gives_an_empty_dataset_with_the_same_columns(tmp_path, tiny_model_dir):
    packed = pack(cfg_for(tiny_model_dir), make_prepared(tmp_path, [qa(0)], []), tmp_path / "p")
    ev, tr = load(packed, "eval"), load(packed, "train")
    assert len(ev) == 0 and ev.features == tr.features


@pytest.mark.parametrize(
    "rows,match",
    [
        ([], r"train\.jsonl: no training examples"),
        (
            [conv([("user", "hi")], 0)],
            r"example \w+, data\.jsonl row 1: the conversation must end with an assistant",
        ),
        ([conv([("robot", "hi"), ("assistant", "x")], 0)], r"message 0 needs a `role`"),
    ],
)
def test_bad_prepared_rows_are_user_errors(tmp_path, tiny_model_dir, rows, match):
    with pytest.raises(UserError, match=match):
        pack(cfg_for(tiny_model_dir), make_prepared(tmp_path, rows), tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_template_errors_and_missing_inputs_are_user_errors(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="not found; expected a prepared_dataset"):
        pack(cfg_for(tiny_model_dir), tmp_path / "nowhere", tmp_path / "p")
    refusing = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    cfg = config.from_dict({"model": {"name_or_path": str(tiny_model_dir), "chat_template": refusing}})
    prepared = make_prepared(tmp_path, [qa(0), conv(MULTI_TURN, 1)])
    with pytest.raises(UserError, match=r"data\.jsonl row 2: the chat template cannot render it .*no system"):
        pack(cfg, prepared, tmp_path / "p")


@pytest.mark.slow  # converts the quickstart GGUF model once (~20 s)
def test_real_smollm2_template_masks(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    rows = [conv(MULTI_TURN, 0), conv([("user", "Name a colour."), ("assistant", "Blue.")], 1)]
    packed = pack(cfg_for(smollm2_dir), make_prepared(tmp_path, rows, rows), tmp_path / "p")
    tok = AutoTokenizer.from_pretrained(packed / "tokenizer")
    for row, src in zip(load(packed, "eval"), rows, strict=True):
        assistant = [m["content"] for m in src["messages"] if m["role"] == "assistant"]
        assert [tok.decode(r) for r in loss_runs(row)] == [a + "<|im_end|>" for a in assistant]
        assert row["input_ids"] == chat_ids(tok, src["messages"])
