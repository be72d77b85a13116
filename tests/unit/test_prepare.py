"""The prepare stage end to end on small files: formats, sources, bad-row policy, dedupe, split, outputs."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune import prepare as prepare_mod
from kubetune.artifacts import file_digest, read_manifest
from kubetune.config import from_dict
from kubetune.errors import UserError
from kubetune.formats import canonical
from kubetune.prepare import eval_count, prepare, split


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg_for(path, **data):
    return from_dict({"data": {"path": str(path), **data}})


def run(path, out, **data):
    return prepare(cfg_for(path, **data), out)


def records(folder, name="train.jsonl"):
    return [json.loads(line) for line in (Path(folder) / name).read_text(encoding="utf-8").splitlines()]


def report(folder):
    return json.loads((Path(folder) / "data_report.json").read_text(encoding="utf-8"))


def qa(i):
    return {"question": f"What is {i} + {i}?", "answer": str(2 * i)}


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


# ----------------------------------------------------------------------------------------------------------
# Formats, through files


@pytest.mark.parametrize(
    ("rows", "fmt", "expected"),
    [
        (
            [{"conversations": ["q1", "a1", "q2", "a2"], "source": "wikihow"}],
            "lima",
            [u("q1"), a("a1"), u("q2"), a("a2")],
        ),
        ([{"instruction": "Say hi", "response": "Hi"}], "instruction", [u("Say hi"), a("Hi")]),
        ([{"instruction": "Sum", "input": "1 2", "output": "3"}], "alpaca", [u("Sum\n\n1 2"), a("3")]),
        ([{"prompt": "p", "completion": "c"}], "prompt_completion", [u("p"), a("c")]),
        ([{"question": "q", "answer": "r"}], "question_answer", [u("q"), a("r")]),
        (
            [{"messages": [s("sys"), u("q1"), a("a1"), u("q2"), a("a2")]}],
            "messages",
            [s("sys"), u("q1"), a("a1"), u("q2"), a("a2")],
        ),
        (
            [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}],
            "messages",
            [u("q"), a("r")],
        ),
    ],
)
def test_each_format_end_to_end(tmp_path, rows, fmt, expected):
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    out = run(src, tmp_path / "out", eval_size=0)
    (rec,) = records(out)
    assert rec == {
        "id": hashlib.sha1(canonical(expected).encode()).hexdigest(),
        "messages": expected,
        "source": str(src),
        "row": 1,
        "format": fmt,
    }
    assert records(out, "eval.jsonl") == []
    rep = report(out)
    assert rep["sources"][0]["format"] == fmt and rep["sources"][0]["detected"] is True
    assert rep["formats"] == {fmt: {"rows_read": 1, "kept": 1}}


def test_format_override_beats_detection(tmp_path):
    row = {"instruction": "i", "output": "o", "question": "q", "answer": "r"}
    src = write_jsonl(tmp_path / "d.jsonl", [row])
    auto = run(src, tmp_path / "auto", eval_size=0)
    assert records(auto)[0]["messages"] == [u("i"), a("o")]
    forced = run(src, tmp_path / "forced", eval_size=0, format="question_answer")
    assert records(forced)[0]["messages"] == [u("q"), a("r")]
    assert records(forced)[0]["format"] == "question_answer"
    assert report(forced)["sources"][0]["detected"] is False


def test_override_to_a_format_the_rows_lack_reports_each_row(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [qa(1), qa(2)])
    with pytest.raises(UserError, match=r"d\.jsonl: 2 bad rows \(line 1: missing field `messages`; line 2: "):
        run(src, tmp_path / "out", format="messages")


def test_undetectable_format_names_file_line_and_fields(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('[1, 2]\n{"text": "hello", "label": 1}\n', encoding="utf-8")
    with pytest.raises(UserError) as info:
        run(src, tmp_path / "out")
    msg = str(info.value)
    assert msg.startswith(f"{src} line 2: cannot tell the row format from its fields ('text', 'label')")
    assert "set data.format" in msg
    assert not (tmp_path / "out").exists()


def test_system_prompt_is_added_where_missing(tmp_path):
    src = write_jsonl(tmp_path / "m.jsonl", [{"messages": [u("q"), a("r")]}, {"messages": [s("own"), u("q"), a("r")]}])
    out = run(src, tmp_path / "out", eval_size=0, system_prompt="Be exact.")
    assert [r["messages"][0] for r in records(out)] == [s("Be exact."), s("own")]
    assert report(out)["train"]["with_system_message"] == 2
    qa_src = write_jsonl(tmp_path / "qa.jsonl", [qa(1)])
    assert records(run(qa_src, tmp_path / "qa", eval_size=0, system_prompt="S"))[0]["messages"][0] == s("S")


# ----------------------------------------------------------------------------------------------------------
# Sources


def test_json_list_parquet_csv_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text(json.dumps([qa(1), qa(2)]), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"messages": [u("pq"), a("r")]}]), folder / "b.parquet")
    with open(folder / "sub" / "c.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["multi\nline, with comma", "", "ok"])
        w.writerow(["second", "ctx", "fine"])
    write_jsonl(folder / "d.jsonl", [{"conversations": ["l1", "l2"]}])
    (folder / "README.md").write_text("not data")
    (folder / ".hidden.jsonl").write_text("garbage")

    out = run(folder, tmp_path / "out", eval_size=0)
    recs = records(out)
    assert [(Path(r["source"]).name, r["row"], r["format"]) for r in recs] == [
        ("a.json", 1, "question_answer"),
        ("a.json", 2, "question_answer"),
        ("b.parquet", 1, "messages"),
        ("d.jsonl", 1, "lima"),
        ("c.csv", 1, "alpaca"),
        ("c.csv", 2, "alpaca"),
    ]
    assert recs[4]["messages"] == [u("multi\nline, with comma"), a("ok")]
    assert recs[5]["messages"] == [u("second\n\nctx"), a("fine")]
    rep = report(out)
    assert {Path(x["source"]).name: x["format"] for x in rep["sources"]} == {
        "a.json": "question_answer",
        "b.parquet": "messages",
        "c.csv": "alpaca",
        "d.jsonl": "lima",
    }
    assert rep["formats"]["alpaca"] == {"rows_read": 2, "kept": 2}
    files = read_manifest(out, "prepare")["inputs"]["data"]["files"]
    assert {Path(f["path"]).name for f in files} == {"a.json", "b.parquet", "c.csv", "d.jsonl"}
    assert all(f["sha256"] == file_digest(f["path"]) for f in files)


def test_csv_list_columns_bad_bytes_and_field_counts(tmp_path):
    src = tmp_path / "d.csv"
    src.write_bytes(
        b"messages,extra\n"
        b'"[{""role"": ""user"", ""content"": ""q""}, {""role"": ""assistant"", ""content"": ""r""}]",x\n'
        b"too,many,fields\n"
        b'"bad \xff byte",y\n'
    )
    with pytest.raises(UserError) as info:
        run(src, tmp_path / "out")
    msg = str(info.value)
    assert msg.startswith(f"{src}: 2 bad rows (row 2: has 3 fields, the header has 2 (line 3;")
    assert "row 3: not UTF-8 text (byte 0xff at byte offset" in msg
    out = run(src, tmp_path / "out", on_bad_rows="skip", eval_size=0)
    assert records(out)[0]["messages"] == [u("q"), a("r")]


def test_json_wrapper_object_is_refused_not_guessed(tmp_path):
    src = tmp_path / "d.json"
    src.write_text(json.dumps({"data": [qa(1)], "version": 2}), encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.json: the top level is an object \(keys 'data', 'version'\), expected"):
        run(src, tmp_path / "out")


def test_json_lines_saved_as_json_is_read_line_by_line(tmp_path):
    src = tmp_path / "d.json"
    src.write_text(json.dumps(qa(1)) + "\n" + json.dumps(qa(2)) + "\n", encoding="utf-8")
    out = run(src, tmp_path / "out", eval_size=0)
    assert [r["row"] for r in records(out)] == [1, 2]


def test_malformed_json_file_names_line_and_column(tmp_path):
    src = tmp_path / "d.json"
    src.write_text('[\n {"question": "q", "answer": "a"},\n {"question": }\n]', encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.json line 3 column 15: not valid JSON"):
        run(src, tmp_path / "out")


def test_corrupt_parquet_is_a_user_error(tmp_path):
    src = tmp_path / "d.parquet"
    src.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"d\.parquet: not a readable Parquet file"):
        run(src, tmp_path / "out")


def test_saved_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([qa(1), qa(2)]).save_to_disk(str(tmp_path / "saved"))
    out = run(tmp_path / "saved", tmp_path / "out", eval_size=0)
    assert [r["row"] for r in records(out)] == [1, 2]
    assert read_manifest(out)["inputs"]["data"]["kind"] == "saved"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("./missing.jsonl", "file not found"),
        ("data/missing.jsonl", "file not found"),
        ("a/b/c", "file not found"),
        ("~/nope/x", "file not found"),
        ("owner/name.csv", "file not found"),
        ("not a hub id!", "neither an existing file or folder nor a hub dataset id"),
        ("", "config key `data.path` is not set"),
    ],
)
def test_local_or_hub_decision_for_missing_paths(tmp_path, monkeypatch, spec, match):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("must not reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=match):
        run(spec, tmp_path / "out")


def test_unsupported_extension_and_empty_folder(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(UserError, match=r"unsupported file type `\.txt`"):
        run(tmp_path / "d.txt", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="folder has no data files"):
        run(tmp_path / "empty", tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# Hugging Face hub (no hub here: load_dataset is replaced)


def fake_hub(monkeypatch, rows, calls):
    import datasets

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_hub_dataset(tmp_path, monkeypatch):
    calls: list = []
    lima_rows = [
        {"conversations": ["q1", "a1"], "source": "stackexchange"},
        {"conversations": ["q2", "a2", "q3", "a3"], "source": "wikihow"},
    ]
    fake_hub(monkeypatch, lima_rows, calls)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    out = run("GAIR/lima", tmp_path / "out", split="train", revision="abc123", eval_size=0)
    assert calls == [("GAIR/lima", {"split": "train", "revision": "abc123", "token": "hf_secret"})]
    recs = records(out)
    assert [(r["source"], r["row"], r["format"]) for r in recs] == [
        ("GAIR/lima", 1, "lima"),
        ("GAIR/lima", 2, "lima"),
    ]
    assert recs[1]["messages"] == [u("q2"), a("a2"), u("q3"), a("a3")]
    inputs = read_manifest(out)["inputs"]["data"]
    assert inputs["kind"] == "hub" and inputs["id"] == "GAIR/lima" and inputs["revision"] == "abc123"
    assert inputs["fingerprint"]
    assert "hf_secret" not in (out / "manifest.json").read_text()

    # Same dataset: a no-op. Changed dataset content: a different fingerprint, refused without overwrite.
    assert run("GAIR/lima", tmp_path / "out", split="train", revision="abc123", eval_size=0) == out
    fake_hub(monkeypatch, [*lima_rows, {"conversations": ["q4", "a4"], "source": "x"}], calls)
    with pytest.raises(UserError, match="holds a different `prepare` output"):
        run("GAIR/lima", tmp_path / "out", split="train", revision="abc123", eval_size=0)


@pytest.mark.parametrize(
    ("exc", "match"),
    [
        ("not_found", "not found or not accessible .*set HF_TOKEN"),
        ("gated", "not found or not accessible .*accept its terms"),
        ("offline", "cannot reach the Hugging Face hub"),
        ("split", r"Unknown split .*check `data.path` and `data.split`"),
    ],
)
def test_hub_errors(tmp_path, monkeypatch, exc, match):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    errors = {
        "not_found": DatasetNotFoundError("Dataset 'GAIR/lima' doesn't exist on the Hub or cannot be accessed."),
        "gated": DatasetNotFoundError("Dataset 'GAIR/lima' is a gated dataset on the Hub. You must be authenticated."),
        "offline": ConnectionError("Couldn't reach 'GAIR/lima' on the Hub (LocalEntryNotFoundError)"),
        "split": ValueError("Unknown split \"tran\". Should be one of ['train']."),
    }

    def load_dataset(*args, **kwargs):
        raise errors[exc]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(UserError, match=match) as info:
        run("GAIR/lima", tmp_path / "out")
    assert str(info.value).startswith("hub dataset `GAIR/lima` (split `train`)")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# Validation and the bad-row policy


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"[1, 2]", "line 2: not an object (got list"),
        (b'{"question": "q"}', "line 2: missing field `answer`"),
        (b'{"question": "", "answer": "r"}', "line 2: field `question` is empty"),
        (b'{"question": "q", "answer": 42}', "line 2: field `answer` must be a string, got number"),
        (b'{"question": "q", "answer": "r"', "line 2: not valid JSON (Expecting ',' delimiter at column 32)"),
        (
            b'{"question": "q", "answer": "\xff"}',
            "line 2: not UTF-8 text (byte 0xff at byte offset 75 of the file)",
        ),
        (b'{"question": "q", "answer": "\\ud800"}', "line 2: field `answer` holds an unpaired surrogate"),
        (b"[" * 100_000, "line 2: not valid JSON"),
        (b'{"question": "q", "answer": ' + b"9" * 5000 + b"}", "line 2: not valid JSON"),
    ],
)
def test_each_validation_error_names_file_and_line(tmp_path, line, reason):
    src = tmp_path / "d.jsonl"
    src.write_bytes(json.dumps(qa(1)).encode() + b"\n" + line + b"\n" + json.dumps(qa(3)).encode() + b"\n")
    # The UTF-8 case: line 1 is 45 bytes plus its newline, the bad byte is at index 29 of line 2.
    assert len(json.dumps(qa(1)).encode()) + 1 + 29 == 75
    with pytest.raises(UserError) as info:
        run(src, tmp_path / "out")
    msg = str(info.value)
    assert msg.startswith(f"{src}: 1 bad row ({reason}")
    assert msg.endswith("; fix them or set data.on_bad_rows=skip")
    assert "\n" not in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        (
            [{"messages": [u("q"), u("q2"), a("r")]}],
            "roles out of order: `messages[1]` is `user` after `user`",
        ),
        ([{"messages": [u("q")]}], "no assistant turn"),
        ([{"messages": [u("q"), a("r"), u("q2")]}], "conversation ends with a user turn"),
        ([{"messages": [u("q"), a(" ")]}], "`messages[1]`.content is empty"),
        ([{"conversations": ["q", "r", "q2"]}], "conversation ends with a user turn (3 turns)"),
    ],
)
def test_conversation_errors(tmp_path, rows, reason):
    good = {"messages": [u("ok"), a("fine")]} if "messages" in rows[0] else {"conversations": ["ok", "fine"]}
    src = write_jsonl(tmp_path / "d.jsonl", [good, *rows])
    with pytest.raises(UserError) as info:
        run(src, tmp_path / "out")
    assert str(info.value).startswith(f"{src}: 1 bad row (line 2: {reason}")


def test_error_lists_first_three_and_total(tmp_path):
    src = tmp_path / "x.jsonl"
    lines = [json.dumps(qa(0)), json.dumps({"question": "q"}), "{oops"] + [json.dumps(qa(i)) for i in range(1, 4)]
    lines += ["[]", "7", json.dumps({"question": "q", "answer": ""})]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        run(src, tmp_path / "out")
    assert str(info.value) == (
        f"{src}: 5 bad rows (line 2: missing field `answer`; line 3: not valid JSON (Expecting property name "
        "enclosed in double quotes at column 2); line 7: not an object (got list []); and 2 more); "
        "fix them or set data.on_bad_rows=skip"
    )


def test_skip_policy_records_every_dropped_row(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text(
        "\n".join([json.dumps(qa(1)), json.dumps({"question": "q"}), "", "{oops", json.dumps(qa(2)), "5"]) + "\n",
        encoding="utf-8",
    )
    out = run(src, tmp_path / "out", on_bad_rows="skip", eval_size=0)
    assert [r["row"] for r in records(out)] == [1, 5]
    rep = report(out)
    assert rep["bad_rows"] == [
        {
            "source": str(src),
            "row": 2,
            "unit": "line",
            "code": "missing_field",
            "reason": "missing field `answer`",
        },
        {
            "source": str(src),
            "row": 4,
            "unit": "line",
            "code": "invalid_json",
            "reason": "not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        },
        {
            "source": str(src),
            "row": 6,
            "unit": "line",
            "code": "not_object",
            "reason": "not an object (got number 5)",
        },
    ]
    assert rep["bad_rows_by_reason"]["missing_field"] == {
        "reason": "missing field",
        "count": 1,
        "examples": [f"{src} line 2: missing field `answer`"],
    }
    assert rep["totals"]["rows_read"] == 5 and rep["totals"]["bad_rows"] == 3
    assert rep["sources"][0]["blank_lines"] == 1
    md = (out / "data_report.md").read_text()
    assert "## Dropped rows (3)" in md and f"{src} line 4: not valid JSON" in md
    assert read_manifest(out)["counts"]["bad_rows"] == 3


def test_empty_file_and_no_usable_rows(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"empty\.jsonl: no rows \(the file is empty\)"):
        run(empty, tmp_path / "out")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": ""}, {"question": "q2"}])
    with pytest.raises(UserError, match=r"bad\.jsonl: no usable rows \(2 read, 2 bad \(line 1: field `answer` is"):
        run(bad, tmp_path / "out", on_bad_rows="skip")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob("out.tmp-*")) == []


def test_messages_reasons_in_markdown_escape_table_pipes(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [qa(1), {"question": "q", "answer": ["a|b"]}])
    out = run(src, tmp_path / "out", on_bad_rows="skip", eval_size=0)
    row = next(line for line in (out / "data_report.md").read_text().splitlines() if line.startswith("| wrong type"))
    assert row.count(" | ") == 2 and "a\\|b" in row


# ----------------------------------------------------------------------------------------------------------
# Dedupe


def test_exact_duplicates_removed_keeping_first(tmp_path):
    rows = [qa(1), qa(2), qa(1), {"question": "What is 1 + 1?", "answer": "2", "extra": "ignored"}, qa(3)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    out = run(src, tmp_path / "out", eval_size=0)
    assert [r["row"] for r in records(out)] == [1, 2, 5]
    rep = report(out)
    assert rep["totals"]["duplicates_removed"] == 2
    assert rep["duplicate_examples"] == [
        f"{src} line 3 repeats {src} line 1",
        f"{src} line 4 repeats {src} line 1",
    ]
    kept_all = run(src, tmp_path / "all", eval_size=0, dedupe=False)
    assert [r["row"] for r in records(kept_all)] == [1, 2, 3, 4, 5]


def test_system_prompt_makes_conversations_distinct_only_when_it_differs(tmp_path):
    rows = [{"messages": [u("q"), a("r")]}, {"messages": [s("S"), u("q"), a("r")]}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    assert len(records(run(src, tmp_path / "o1", eval_size=0))) == 2
    assert len(records(run(src, tmp_path / "o2", eval_size=0, system_prompt="S"))) == 1


# ----------------------------------------------------------------------------------------------------------
# Split


@pytest.mark.parametrize(
    ("n", "size", "expected"),
    [
        (100, 0.1, 10),
        (10, 0.25, 3),
        (10, 0.01, 1),
        (2, 0.1, 1),
        (1, 0.5, 0),
        (100, 0, 0),
        (100, 7, 7),
        (5, 10, 4),
    ],
)
def test_eval_count(n, size, expected):
    assert eval_count(n, size)[0] == expected


def ids(n, salt=""):
    return [hashlib.sha1(f"{salt}{i}".encode()).digest() for i in range(n)]


def test_split_is_seeded_and_order_independent():
    rows = ids(200)
    first = split(rows, 20, seed=1)
    assert len(first) == 20 and first == split(rows, 20, seed=1)
    assert first != split(rows, 20, seed=2)
    reversed_rows = rows[::-1]
    assert {rows[i] for i in first} == {reversed_rows[i] for i in split(reversed_rows, 20, seed=1)}
    assert split(rows, 0, seed=1) == set()


def test_split_through_prepare(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(200)])
    o1 = run(src, tmp_path / "o1", seed=7, eval_size=0.1)
    o2 = run(src, tmp_path / "o2", seed=7, eval_size=0.1)
    o3 = run(src, tmp_path / "o3", seed=8, eval_size=0.1)
    ev = [r["id"] for r in records(o1, "eval.jsonl")]
    assert len(ev) == 20 and ev == [r["id"] for r in records(o2, "eval.jsonl")]
    assert set(ev) != {r["id"] for r in records(o3, "eval.jsonl")}
    train = records(o1)
    assert len(train) == 180 and not set(ev) & {r["id"] for r in train}
    assert [r["row"] for r in train] == sorted(r["row"] for r in train)  # source order is kept
    assert report(o1)["totals"] | {"train_rows": 180, "eval_rows": 20} == report(o1)["totals"]
    counted = run(src, tmp_path / "o4", eval_size=5)
    assert len(records(counted, "eval.jsonl")) == 5


def test_split_does_not_depend_on_python_hash_seed(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(50)])
    code = (
        "import sys, json; from kubetune.config import from_dict; from kubetune.prepare import prepare; "
        "out = prepare(from_dict({'data': {'path': sys.argv[1], 'eval_size': 0.2}}), sys.argv[2]); "
        "print(open(out / 'eval.jsonl').read())"
    )
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", code, str(src), str(tmp_path / f"o{seed}")],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1] and outputs[0].count("\n") >= 10


def test_tiny_inputs_keep_a_train_row(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [qa(1)])
    with pytest.raises(UserError, match=r"one.jsonl: only 1 usable row.*data.eval_size=0"):
        run(one, tmp_path / "o1", eval_size=0.5)  # no held-out row possible: refused before any training
    assert not (tmp_path / "o1").exists()
    out = run(one, tmp_path / "o1", eval_size=0)
    assert len(records(out)) == 1 and records(out, "eval.jsonl") == []
    two = write_jsonl(tmp_path / "two.jsonl", [qa(1), qa(2)])
    out2 = run(two, tmp_path / "o2", eval_size=0.01)
    assert len(records(out2)) == 1 and len(records(out2, "eval.jsonl")) == 1
    out3 = run(two, tmp_path / "o3", eval_size=50)
    assert len(records(out3)) == 1 and "asks for 50 eval rows" in report(out3)["notes"][0]


def test_eval_path(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(6)])
    held = write_jsonl(tmp_path / "held.jsonl", [qa(4), qa(5), qa(100), qa(100)])
    out = run(train, tmp_path / "out", eval_path=str(held), eval_size=0.5)
    assert [r["row"] for r in records(out)] == [1, 2, 3, 4]  # qa(4), qa(5) are eval rows: not trained on
    ev = records(out, "eval.jsonl")
    assert [(r["source"], r["row"]) for r in ev] == [(str(held), 1), (str(held), 2), (str(held), 3)]
    rep = report(out)
    assert rep["totals"]["removed_as_in_eval"] == 2 and rep["totals"]["duplicates_removed"] == 1
    assert rep["split"] == {"method": "explicit eval file", "eval_path": str(held)}
    assert set(read_manifest(out)["inputs"]) == {"data", "eval_data"}

    bad_eval = write_jsonl(tmp_path / "bad_eval.jsonl", [qa(1), {"question": "q"}])
    with pytest.raises(UserError, match=r"bad_eval\.jsonl: 1 bad row \(line 2: missing field `answer`"):
        run(train, tmp_path / "out2", eval_path=str(bad_eval))
    with pytest.raises(UserError, match=r"nope\.jsonl: file not found \(config key `data.eval_path`\)"):
        run(train, tmp_path / "out3", eval_path=str(tmp_path / "nope.jsonl"))


def test_max_rows_caps_kept_rows_before_split(tmp_path):
    rows = [qa(0), qa(0), {"question": "q"}] + [qa(i) for i in range(1, 50)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    out = run(src, tmp_path / "out", max_rows=10, eval_size=0.2, on_bad_rows="skip")
    assert len(records(out)) + len(records(out, "eval.jsonl")) == 10
    rep = report(out)
    assert rep["max_rows_reached_at"] == f"{src} line 12"
    t = rep["totals"]
    assert t["rows_read"] == 12 == t["rows_kept"] + t["duplicates_removed"] + t["bad_rows"]


# ----------------------------------------------------------------------------------------------------------
# Output: atomic, re-runnable, fingerprinted


def test_rerun_is_a_noop_and_changed_input_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(10)])
    out = run(src, tmp_path / "out")
    manifest = read_manifest(out, "prepare")
    assert manifest["inputs"]["data"]["files"][0]["sha256"] == file_digest(src)
    assert manifest["config"]["path"] == str(src)
    assert manifest["counts"] == {
        "rows_read": 10,
        "rows_kept": 10,
        "train_rows": 9,
        "eval_rows": 1,
        "bad_rows": 0,
        "duplicates_removed": 0,
    }
    assert sorted(p.name for p in out.iterdir()) == [
        "data_report.json",
        "data_report.md",
        "eval.jsonl",
        "manifest.json",
        "train.jsonl",
    ]
    before = (out / "manifest.json").stat().st_mtime_ns
    assert run(src, tmp_path / "out") == out
    assert (out / "manifest.json").stat().st_mtime_ns == before

    write_jsonl(src, [qa(i) for i in range(11)])
    with pytest.raises(UserError, match=r"holds a different `prepare` output .*pass --overwrite"):
        run(src, tmp_path / "out")
    assert len(records(out)) == 9  # untouched
    prepare(cfg_for(src), tmp_path / "out", overwrite=True)
    assert read_manifest(out)["counts"]["rows_read"] == 11
    assert read_manifest(out)["fingerprint"] != manifest["fingerprint"]

    # A config change (the seed) also changes the fingerprint.
    with pytest.raises(UserError, match="holds a different"):
        run(src, tmp_path / "out", seed=3)


def test_failing_run_leaves_no_output(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(10)])

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_mod, "render_markdown", boom)
    with pytest.raises(RuntimeError):
        run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob("out.tmp-*")) == []


def test_progress_and_summary_are_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(prepare_mod, "_PROGRESS_EVERY_S", 0.0)
    src = write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(2500)])
    with caplog.at_level(logging.INFO, logger="kubetune.prepare"):
        run(src, tmp_path / "out")
    messages = [r.getMessage() for r in caplog.records if r.name == "kubetune.prepare"]
    assert any("2000 rows read (" in m and "rows/s)" in m for m in messages)
    assert messages[-1].startswith("prepare: 2500 rows read, 2500 kept -> 2250 train / 250 eval (0 bad")


# ----------------------------------------------------------------------------------------------------------
# The real LIMA file (../shared/data, skipped when absent)


def test_lima_file(tmp_path, lima_path):
    out = run(lima_path, tmp_path / "out")
    train, ev = records(out), records(out, "eval.jsonl")
    assert len(train) + len(ev) == 1022 and len(ev) == 102
    first = json.loads(lima_path.open(encoding="utf-8").readline())
    rec = next(r for r in train + ev if r["row"] == 1)
    assert rec["messages"] == [u(first["instruction"]), a(first["response"])]
    assert {r["format"] for r in train} == {"instruction"}
    rep = report(out)
    assert rep["totals"]["bad_rows"] == 0 and rep["totals"]["duplicates_removed"] == 0
    assert rep["train"]["turns"]["max"] == 2
    assert "1022 rows read, 1022 kept: 920 train / 102 eval" in (out / "data_report.md").read_text()


def test_output_lines_survive_any_line_splitter(tmp_path):
    text = "a\u2028b\x85c\u2029d\x0be\x1cf é 中"
    src = write_jsonl(tmp_path / "d.jsonl", [{"question": text, "answer": "ok"}])
    out = run(src, tmp_path / "out", eval_size=0)
    raw = (out / "train.jsonl").read_text(encoding="utf-8")
    assert len(raw.splitlines()) == 1 and "é 中" in raw  # still readable UTF-8, not \u-escaped
    assert json.loads(raw)["messages"][0]["content"] == text
