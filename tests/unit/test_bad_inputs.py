"""The bad-input catalogue: every case goes through the `kubetune` command line and must end with exit code 2,
exactly one line on stderr that starts with ``kubetune: error:`` and names the place (file, row, key, folder), no
traceback, and no output folder of the failed stage that looks complete (no manifest.json, no temp folder left).

The cases run in-process (``kubetune.cli.main``) to stay fast; a few run as real subprocesses as well, to check the
whole stderr of a real process. Property tests drive the config loader with arbitrary mappings and ``--set`` values.
Prepare's own property tests (arbitrary rows) live in test_prepare_properties.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kubetune import cli, config
from kubetune.artifacts import MANIFEST, read_manifest
from kubetune.config import ConfigError

# ----------------------------------------------------------------------------------------------------
# The workspace: a good config, data, prepared and packed folders, and the broken things the cases point at


@dataclass
class Bad:
    root: Path
    config: Path
    prepared: Path
    packed: Path
    files: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Path:
        return self.files[name]


def _rows(n: int, start: int = 0) -> str:
    return "".join(
        json.dumps({"instruction": f"what is {i} plus {i}?", "response": f"it is {2 * i}."}) + "\n"
        for i in range(start, start + n)
    )


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model_dir) -> Bad:
    from kubetune.pack import pack
    from kubetune.prepare import prepare

    root = tmp_path_factory.mktemp("bad-inputs")
    f: dict[str, Path] = {}

    def put(name: str, content: str | bytes) -> Path:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        f[name] = p
        return p

    good = put("good.jsonl", _rows(24))
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"path": str(good), "eval_size": 4},
        "pack": {"max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 1, "batch_size": 2, "threads": 1, "save_steps": 1},
        "output_dir": str(root / "run"),
        "tracking": {"enabled": False},
    }
    cfg_path = put("config.yaml", yaml.safe_dump(cfg))
    loaded = config.load(cfg_path)
    prepared = prepare(loaded, root / "prepared")
    packed = pack(loaded, prepared, root / "packed")

    # Data files
    put("malformed.jsonl", _rows(2) + '{"instruction": "q3", "resp\n' + _rows(2, 3))
    put("missing-field.jsonl", _rows(1) + json.dumps({"instruction": "no answer here"}) + "\n" + _rows(1, 5))
    put("empty.jsonl", "")
    put("latin1.jsonl", '{"instruction": "caf\xe9?", "response": "yes"}\n'.encode("latin-1"))
    put("huge-line.jsonl", _rows(1) + "x" * (50 << 20) + "\n")  # a 50 MB line that is not JSON
    put("duplicates.jsonl", _rows(1) * 40)
    put(
        "long.jsonl",
        "".join(json.dumps({"instruction": "why? " * 60, "response": "because " * 60}) + "\n" for _ in range(6)),
    )
    put("notes.txt", "not a dataset\n")
    # Model folders and files
    model = tiny_model_dir
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        put(f"no-weights/{name}", (model / name).read_bytes())
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        put(f"no-config/{name}", (model / name).read_bytes())
    put("fake.gguf", b"GGUF? no: just some bytes that are not a GGUF file")
    put("weights.bin", b"\0" * 64)
    # Config files
    put("broken.yaml", "lora: [1, 2\n")
    put("latin1.yaml", b"lora:\n  r: \xff\xfe\n")
    put("list.yaml", "- a\n- b\n")
    put("typo.yaml", yaml.safe_dump({**cfg, "trian": {"max_steps": 3}}))
    # Folders given where a stage output is expected
    (root / "half-done").mkdir()
    put("half-done/train.jsonl", _rows(3))
    # A checkpoint folder that holds another run's checkpoint
    other = root / "other-run-checkpoints" / "checkpoint-1"
    other.mkdir(parents=True)
    (other / "trainer_state.json").write_text("{}")
    (other / "kubetune-complete.json").write_text(json.dumps({"step": 1, "fingerprint": "0" * 64, "files": {}}))
    return Bad(root, cfg_path, prepared, packed, f)


# ----------------------------------------------------------------------------------------------------
# The catalogue


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Bad, Path], list[str]]  # (workspace, the failed stage's output folder) -> arguments
    needle: Callable[[Bad], str] | str  # must appear in the error line: the place and what is wrong
    env: dict[str, str] = field(default_factory=dict)


def prep(*extra: str) -> Callable[[Bad, Path], list[str]]:
    return lambda b, out: ["prepare", "-c", str(b.config), "--out", str(out), *extra]


def prep_data(name: str, *extra: str) -> Callable[[Bad, Path], list[str]]:
    return lambda b, out: ["prepare", "-c", str(b.config), "--data", str(b[name]), "--out", str(out), *extra]


def pack_(*extra: str, prepared: Callable[[Bad], Path] | None = None) -> Callable[[Bad, Path], list[str]]:
    def argv(b: Bad, out: Path) -> list[str]:
        src = prepared(b) if prepared else b.prepared
        return ["pack", "-c", str(b.config), "--prepared", str(src), "--out", str(out), *extra]

    return argv


def model(name: str) -> Callable[[Bad, Path], list[str]]:
    """Pack with ``model.name_or_path`` set to the workspace file or folder ``name``."""
    return lambda b, out: pack_("--set", f"model.name_or_path={b.root / name}")(b, out)


def train_(*extra: str, packed: Callable[[Bad], Path] | None = None) -> Callable[[Bad, Path], list[str]]:
    def argv(b: Bad, out: Path) -> list[str]:
        src = packed(b) if packed else b.packed
        ckpt = out.parent / "checkpoints"
        return [
            "train",
            "-c",
            str(b.config),
            "--packed",
            str(src),
            "--out",
            str(out),
            "--set",
            f"train.checkpoint_dir={ckpt}",
            *extra,
        ]

    return argv


def cfg_file(name: str, *extra: str) -> Callable[[Bad, Path], list[str]]:
    return lambda b, out: ["prepare", "-c", str(b[name]), "--out", str(out), *extra]


CASES = [
    # --- config files and values
    Case(
        "config-file-missing",
        lambda b, out: ["prepare", "-c", str(b.root / "nope.yaml"), "--out", str(out)],
        "nope.yaml: not found",
    ),
    Case("config-not-yaml", cfg_file("broken.yaml"), "broken.yaml line 2: not valid YAML"),
    Case("config-not-utf8", cfg_file("latin1.yaml"), "latin1.yaml: not UTF-8"),
    Case("config-not-a-mapping", cfg_file("list.yaml"), "list.yaml: expected a mapping"),
    Case("unknown-section", cfg_file("typo.yaml"), "unknown config key `trian`; did you mean `train`?"),
    Case("unknown-key", prep("--set", "lora.rank=8"), "unknown config key `lora.rank`"),
    Case("wrong-type", prep("--set", "lora.r=abc"), "`lora.r`: expected an integer"),
    Case("bad-choice", prep("--set", "method=full"), "`method`: 'full' is not one of lora, qlora"),
    Case("nan", prep("--set", "train.learning_rate=.nan"), "`train.learning_rate`: expected a finite number"),
    Case("infinity", prep("--set", "lora.alpha=.inf"), "`lora.alpha`: expected a finite number"),
    Case("negative", prep("--set", "train.batch_size=-4"), "`train.batch_size`: -4 must be >= 1"),
    Case("huge-float", prep("--set", "train.warmup_ratio=1.0e+300"), "`train.warmup_ratio`"),
    Case("huge-rank", train_("--set", "lora.r=1000000000000"), "`lora.r`: 1000000000000"),
    Case("set-without-value", prep("--set", "lora.r"), "--set `lora.r`: expected KEY=VALUE"),
    Case(
        "contradiction",
        prep("--set", "method=qlora", "--set", "quant.bits=8", "--set", "lora.use_dora=true"),
        "`lora.use_dora: true` do not combine",
    ),
    # --- data
    Case(
        "data-path-missing",
        lambda b, out: prep("--data", str(b.root / "nope.jsonl"))(b, out),
        "nope.jsonl: file not found (config key `data.path`)",
    ),
    Case("malformed-json-line", prep_data("malformed.jsonl"), "malformed.jsonl: 1 bad row (line 3: not valid JSON"),
    Case("missing-field", prep_data("missing-field.jsonl"), "line 2: missing field `response`"),
    Case("empty-file", prep_data("empty.jsonl"), "empty.jsonl: no rows"),
    Case("not-utf8", prep_data("latin1.jsonl"), "latin1.jsonl: 1 bad row (line 1: not UTF-8"),
    Case("50-mb-line", prep_data("huge-line.jsonl"), "huge-line.jsonl: 1 bad row (line 2: not valid JSON"),
    Case("unsupported-file-type", prep_data("notes.txt"), "notes.txt: unsupported file type `.txt`"),
    Case(
        "hub-dataset-offline",
        prep("--data", "someorg/some-dataset"),
        "someorg/some-dataset",
        env={"HF_HUB_OFFLINE": "1"},
    ),
    # --- the stage before, and its output
    Case("prepared-missing", pack_(prepared=lambda b: b.root / "nope"), "nope: not found; expected a prepared_dataset"),
    Case(
        "prepared-not-complete",
        pack_(prepared=lambda b: b.root / "half-done"),
        "half-done: incomplete or not a kubetune output",
    ),
    Case(
        "other-stage-output",
        pack_(prepared=lambda b: b.packed),
        "packed: is a `pack` output, expected a prepared_dataset",
    ),
    Case(
        "packed-is-prepared",
        train_(packed=lambda b: b.prepared),
        "prepared: is a `prepare` output, expected a packed_dataset",
    ),
    # --- lengths
    Case(
        "every-example-too-long-error",
        pack_("--set", "pack.max_length=16", "--set", "pack.truncation=error"),
        "tokens > pack.max_length=16",
    ),
    Case(
        "all-rows-too-long-drop",
        pack_("--set", "pack.max_length=16", "--set", "pack.truncation=drop"),
        "examples are longer than pack.max_length=16",
    ),
    # --- models
    Case(
        "model-path-missing",
        pack_("--set", "model.name_or_path=/nonexistent/model"),
        "model path /nonexistent/model: not found",
    ),
    Case("model-without-weights", model("no-weights"), lambda b: f"model folder {b.root / 'no-weights'}: no weights"),
    Case("model-without-config", model("no-config"), lambda b: f"model folder {b.root / 'no-config'}: no config.json"),
    Case("gguf-not-gguf", model("fake.gguf"), "fake.gguf: cannot be read as a GGUF model"),
    Case("model-file-not-gguf", model("weights.bin"), "weights.bin: a file that is not .gguf"),
    Case(
        "hub-model-offline",
        pack_("--set", "model.name_or_path=someorg/some-model"),
        "'someorg/some-model'",
        env={"HF_HUB_OFFLINE": "1"},
    ),
    Case(
        "train-model-path-missing",
        train_("--set", "model.name_or_path=/nonexistent/model"),
        "model path /nonexistent/model: not found",
    ),
    # --- training settings
    Case("resume-not-a-checkpoint", lambda b, out: train_("--set", f"train.resume={b.root}")(b, out), "`train.resume`"),
    Case(
        "target-module-missing",
        train_("--set", "lora.target_modules=[q_proj,nope_proj]"),
        "`lora.target_modules`: nope_proj not found",
    ),
    Case("rank-above-width", train_("--set", "lora.r=64"), "`lora.r`: 64 exceeds the model's hidden size 32"),
    Case(
        "checkpoints-of-another-run",
        lambda b, out: train_("--set", f"train.checkpoint_dir={b.root / 'other-run-checkpoints'}")(b, out),
        "other-run-checkpoints: holds checkpoints of a different run",
    ),
]


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


def check_failure(rc: int, err: str, needle: str, out: Path) -> str:
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("kubetune: error:")]
    assert len(errors) == 1, err[-3000:]
    line = errors[0]
    assert needle in line, line
    assert len(line) < 1000  # quotes no 50 MB of input
    # Nothing that the next stage would accept, and no temp folder left behind.
    assert not (out / MANIFEST).exists()
    assert not list(out.parent.glob(out.name + ".tmp-*"))
    assert not list(out.parent.glob(".*.lock"))  # the one-writer locks go with the process that held them
    assert not (out.parent / "checkpoints").exists()  # train: the inputs are checked before its checkpoint folder
    return line


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_line_naming_the_place(case, bad, tmp_path, capsys, monkeypatch):
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    needle = case.needle(bad) if callable(case.needle) else case.needle
    rc = cli.main(case.argv(bad, out))
    captured = capsys.readouterr()
    check_failure(rc, captured.err, needle, out)
    assert captured.out == ""  # nothing claims success


def test_duplicate_only_data_stops_the_run_with_exit_2(bad, tmp_path, capsys):
    """Forty copies of one conversation: one row survives deduplication; prepare refuses before any training."""
    cfg = yaml.safe_load(bad.config.read_text())
    cfg.update({"output_dir": str(tmp_path / "run")})
    cfg["data"]["path"] = str(bad["duplicates.jsonl"])
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = cli.main(["run", "-c", str(path)])
    err = capsys.readouterr().err
    line = check_failure(rc, err, "data.eval_size", tmp_path / "run" / "prepared")
    assert "39 duplicates" in line and str(bad["duplicates.jsonl"]) in line
    assert not (tmp_path / "run" / "packed").exists()  # stopped before pack and train


def test_a_tokenizer_without_a_chat_template_is_not_an_error(bad, tiny_base_model_dir, tmp_path, capsys):
    """A base model's tokenizer has no chat template: pack uses the fallback template and training works."""
    m = f"model.name_or_path={tiny_base_model_dir}"
    packed = tmp_path / "packed"
    assert (
        cli.main(["pack", "-c", str(bad.config), "--prepared", str(bad.prepared), "--out", str(packed), "--set", m])
        == 0
    )
    template = json.loads((packed / "pack_report.json").read_text())["template"]
    assert (template["source"], template["name"]) == ("fallback", "qa"), template
    rc = cli.main(
        [
            "train",
            "-c",
            str(bad.config),
            "--packed",
            str(packed),
            "--out",
            str(tmp_path / "adapter"),
            "--set",
            m,
            "--set",
            f"train.checkpoint_dir={tmp_path / 'ck'}",
        ]
    )
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert read_manifest(tmp_path / "adapter", "train")["counts"]["global_step"] == 1


# Real processes: the whole stderr of the command, not only what reaches Python's sys.stderr.
SUBPROCESS_CASES = ["unknown-key", "malformed-json-line", "model-without-weights", "target-module-missing"]


@pytest.mark.slow
@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process(case_id, bad, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **case.env}
    r = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", *case.argv(bad, out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    needle = case.needle(bad) if callable(case.needle) else case.needle
    check_failure(r.returncode, r.stderr, needle, out)
    # Everything else on stderr is a timestamped log line.
    others = [ln for ln in r.stderr.splitlines() if ln and not ln.startswith("kubetune: error:")]
    assert all(re.match(r"^\d\d:\d\d:\d\d [DIWE] ", ln) for ln in others), others
    assert r.stdout == ""


@pytest.mark.slow
def test_an_empty_data_file_is_one_line_on_stderr_and_nothing_on_disk(bad, tmp_path):
    """No warning line ahead of the error that says the same thing: the whole stderr is the one error line."""
    out = tmp_path / "new" / "prepared"
    r = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", *prep_data("empty.jsonl")(bad, out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"kubetune: error: {bad['empty.jsonl']}: no rows (the file is empty); point `data.path` at data"
    ]
    assert list(tmp_path.iterdir()) == []  # not even the folder that would have held the output


def test_a_json_error_names_its_column_in_plain_words(bad, tmp_path, capsys):
    """json's own messages end in "starting at" for some errors; the column follows without a doubled "at"."""
    data = tmp_path / "cut.jsonl"
    data.write_text('{"instruction": "one", "response": "two"}\n{"instruction": "unterminated\n')
    out = tmp_path / "out"
    rc = cli.main(prep("--data", str(data))(bad, out))
    line = check_failure(
        rc, capsys.readouterr().err, "line 2: not valid JSON (Unterminated string starting at column 17)", out
    )
    assert "at at" not in line


# ----------------------------------------------------------------------------------------------------
# Property tests: the config loader


def _schema_keys() -> set[str]:
    keys = set(config.from_dict({}).flat())
    return keys | {k.split(".")[0] for k in keys}


SCHEMA = _schema_keys()
SECTIONS = sorted({k.split(".")[0] for k in SCHEMA if "." in k})
LEAVES = sorted(k for k in SCHEMA if "." in k or k in ("method", "output_dir"))

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# Key names without line breaks: config.py quotes a key as it was typed, so a key holding a line break makes a
# two-line message (see test_a_key_with_a_line_break_still_gives_one_line).
key_text = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=10)
names = st.one_of(st.sampled_from(sorted(SCHEMA)), st.sampled_from(LEAVES).map(lambda k: k.split(".")[-1]), key_text)
section_body = st.dictionaries(
    st.one_of(st.sampled_from(LEAVES).map(lambda k: k.split(".")[-1]), names), values, max_size=4
)
documents = st.dictionaries(names, st.one_of(values, section_body), max_size=5)


def _named_key(message: str) -> bool:
    """The message names a config key (or the --set item) between backticks."""
    for token in re.findall(r"`([^`]+)`", message):
        head = re.split(r"[:\[ =]", token.strip(), maxsplit=1)[0]
        if head in SCHEMA or head.split(".")[0] in SCHEMA or head == "<root>":
            return True
    return bool(re.search(r"`[^`]+`", message)) and ("unknown config key" in message or "--set" in message)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_config_loader_rejects_only_with_a_config_error_naming_a_key(doc):
    try:
        cfg = config.from_dict(doc)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message and message
        assert _named_key(message), message
    else:
        assert isinstance(cfg, config.Config)
        assert config.from_dict(cfg.to_dict()) == cfg  # what it accepted round-trips


set_items = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(LEAVES), st.text(max_size=25)),
    st.builds(lambda k, v: f"{k}={v}", names, st.text(max_size=25)),
    key_text,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(set_items, max_size=4))
@example(["`="])  # a backtick key: it must not close the quote around itself
@example(["a\nb"])  # no `=`, a line break: still one line
def test_set_overrides_reject_only_with_a_config_error_naming_a_key(items):
    try:
        cfg = config.load(None, items)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message and message
        assert _named_key(message), message
    else:
        assert isinstance(cfg, config.Config)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(names, st.one_of(values, section_body), max_size=4))
def test_config_files_reject_only_with_a_config_error_naming_file_and_key(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    try:
        config.load(path)
    except ConfigError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        assert _named_key(str(err)), str(err)


def test_a_key_with_a_line_break_still_gives_one_line():
    with pytest.raises(ConfigError) as err:
        config.from_dict({"lora\nx": 1})
    assert "\n" not in str(err.value)
