"""Property-based tests: arbitrary JSON rows (and broken lines) never crash prepare with anything but a
UserError that names the file and row; under `skip` every row read is accounted for exactly once."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kubetune.config import from_dict
from kubetune.errors import UserError
from kubetune.formats import FORMATS, RowError, canonical, normalise
from kubetune.prepare import prepare

FIELDS = [
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "response",
    "prompt",
    "completion",
    "question",
    "answer",
    "system",
    "history",
    "role",
    "content",
    "from",
    "value",
    "source",
]
ROLES = ["system", "user", "assistant", "human", "gpt", "bot", ""]

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
texts = st.sampled_from(["", " ", "hi", "answer", "q?", "\n"]) | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": texts})
    | st.fixed_dictionaries({"from": st.sampled_from(ROLES), "value": texts}),
    max_size=5,
)
# Rows that look like each format, with the right or wrong types and shapes, plus anything at all.
rows = st.one_of(
    st.fixed_dictionaries({"instruction": texts, "response": texts | scalars}),
    st.fixed_dictionaries(
        {"instruction": texts, "output": texts}, optional={"input": texts | scalars, "history": json_values}
    ),
    st.fixed_dictionaries({"question": texts, "answer": texts | json_values}),
    st.fixed_dictionaries({"prompt": texts | messages, "completion": texts | messages}),
    st.fixed_dictionaries({"conversations": st.lists(texts, max_size=5) | json_values}),
    st.fixed_dictionaries({"messages": messages | json_values}, optional={"system": texts}),
    json_values,
)
words = st.sampled_from(["hi", "answer", "What is 2+2?", "4", "a longer reply."]) | st.text(min_size=1, max_size=8)
good_rows = st.one_of(
    st.fixed_dictionaries({"question": words, "answer": words}),
    st.fixed_dictionaries({"instruction": words, "output": words}, optional={"input": words}),
    st.lists(st.tuples(words, words), min_size=1, max_size=2).map(
        lambda pairs: {"conversations": [t for pair in pairs for t in pair]}
    ),
    st.lists(st.tuples(words, words), min_size=1, max_size=2).map(
        lambda pairs: {
            "messages": [
                {"role": r, "content": t} for pair in pairs for r, t in zip(("user", "assistant"), pair, strict=True)
            ]
        }
    ),
)
# A file line: mostly well-formed rows, with arbitrary rows and bytes that are not JSON (truncated JSON,
# invalid UTF-8, blank) mixed in.
lines = st.one_of(
    good_rows.map(lambda r: json.dumps(r).encode()),
    good_rows.map(lambda r: json.dumps(r).encode()),
    rows.map(lambda r: json.dumps(r).encode()),
    rows.map(lambda r: json.dumps(r).encode()[:-1]),
    st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
    st.just(b""),
)

WHERE = re.compile(r"line (\d+)")
# The only rejections that name no row: they are about the file as a whole.
WHOLE_FILE = ("no rows (the file is empty)", "a train/eval split needs at least 2 distinct rows")


def write(folder: Path, content: list[bytes]) -> Path:
    path = folder / "rows.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in content))
    return path


def nonblank_lines(content: list[bytes]) -> set[int]:
    out = set()
    for i, line in enumerate(content, start=1):
        try:
            blank = not line.decode("utf-8").strip()
        except UnicodeDecodeError:
            blank = False
        if not blank:
            out.add(i)
    return out


def check_rejection(err: UserError, path: Path, content: list[bytes]) -> None:
    msg = str(err)
    assert "\n" not in msg
    assert msg.startswith(str(path)), msg
    if any(w in msg for w in WHOLE_FILE):
        return
    named = [int(n) for n in WHERE.findall(msg)]
    assert named, f"rejection names no row: {msg}"
    assert set(named) <= nonblank_lines(content), msg


def check_record(rec: dict, path: Path) -> None:
    msgs = rec["messages"]
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2) and len(body) >= 2
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs)
    assert rec["id"] == hashlib.sha1(canonical(msgs).encode()).hexdigest()
    assert rec["source"] == str(path) and rec["format"] in FORMATS


def read(folder: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (folder / name).read_text(encoding="utf-8").splitlines()]


SETTINGS = settings(
    max_examples=int(os.environ.get("KUBETUNE_PROPERTY_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SETTINGS
@given(content=st.lists(lines, max_size=8))
def test_error_policy_only_raises_user_errors_that_name_the_row(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("prop")
    path = write(folder, content)
    try:
        out = prepare(from_dict({"data": {"path": str(path)}}), folder / "out")
    except UserError as err:
        event("rejected")
        check_rejection(err, path, content)
        assert not (folder / "out").exists()
        return
    event("accepted")
    for rec in read(out, "train.jsonl") + read(out, "eval.jsonl"):
        check_record(rec, path)
    assert json.loads((out / "data_report.json").read_text())["totals"]["bad_rows"] == 0


@SETTINGS
@given(
    content=st.lists(lines, max_size=8),
    dedupe=st.booleans(),
    seed=st.integers(0, 3),
    eval_size=st.sampled_from([0, 0.3, 2]),
)
def test_skip_policy_accounts_for_every_row(tmp_path_factory, content, dedupe, seed, eval_size):
    folder = tmp_path_factory.mktemp("prop")
    path = write(folder, content)
    data = {"path": str(path), "on_bad_rows": "skip", "dedupe": dedupe, "seed": seed, "eval_size": eval_size}
    try:
        out = prepare(from_dict({"data": data}), folder / "out")
    except UserError as err:
        event("rejected")
        check_rejection(err, path, content)
        return
    event("accepted")
    kept = read(out, "train.jsonl") + read(out, "eval.jsonl")
    for rec in kept:
        check_record(rec, path)
    report = json.loads((out / "data_report.json").read_text())
    bad = {b["row"] for b in report["bad_rows"]}
    kept_rows = {r["row"] for r in kept}
    assert not bad & kept_rows
    t = report["totals"]
    assert t["rows_read"] == len(nonblank_lines(content))
    assert t["rows_read"] == t["rows_kept"] + t["bad_rows"] + t["duplicates_removed"]
    assert bad | kept_rows <= nonblank_lines(content)
    assert len(kept) == t["rows_kept"] >= 1 and t["train_rows"] >= 1
    if dedupe:
        assert len({r["id"] for r in kept}) == len(kept)


@settings(max_examples=200, deadline=None)
@given(fmt=st.sampled_from(FORMATS), row=rows, system_prompt=st.none() | st.just("sys"))
def test_normalise_returns_a_valid_conversation_or_a_row_error(fmt, row, system_prompt):
    try:
        msgs = normalise(fmt, row, system_prompt)
    except RowError as err:
        assert err.reason and "\n" not in err.reason and len(err.reason) < 300
        return
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2) and body
    assert all(set(m) == {"role", "content"} for m in msgs)
