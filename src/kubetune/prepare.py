"""The prepare stage: raw dataset -> prepared_dataset (chat conversations, validated, deduplicated, split).

``prepare(cfg, out)`` reads ``cfg.data.path`` (a local .jsonl/.json/.parquet/.csv file, a folder of them, or a
Hugging Face dataset id, see :mod:`kubetune.sources`), detects each file's row format from its fields (or uses
``data.format``), normalises every row to chat messages (:mod:`kubetune.formats`), validates, removes exact
duplicates, splits train/eval and writes, atomically through :func:`kubetune.artifacts.stage_output`:

``train.jsonl``, ``eval.jsonl``
    One conversation per line, in source order::

        {"id": "<sha1 of the canonical messages>",
         "messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...],
         "source": "<file path or hub id>", "row": <1-based line (JSON Lines) or record index>,
         "format": "<row format>"}

    Roles alternate user/assistant after an optional system message; the last message is the assistant's.
``data_report.json``, ``data_report.md``
    Rows read per source and per format, rows kept, train/eval counts, every dropped row with its place and
    reason, duplicates removed, turn and length statistics.
``manifest.json``
    Inputs (sha256 of every file read, or the hub dataset's id/revision/split/fingerprint), the data config,
    counts.

``data.max_rows`` caps the kept training rows before the split (reading stops there); ``data.eval_path``
replaces the split with an explicit held-out file; with ``data.dedupe`` training rows that also appear in it
are dropped (and counted) so that the model is never scored on what it trained on.

Accounting is exact: every row read is kept, counted as a duplicate (or as a copy of an eval row), or
recorded as a bad row. Bad rows stop the stage (``data.on_bad_rows: error``, the default, naming the first
three and the total) or are skipped and listed in the report (``skip``).

The split is a seeded hash of each conversation's id: the same data and seed give the same split on any
machine and Python (no dependence on ``hash()`` randomisation), and a row's side does not depend on where it
sits in the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune import artifacts, formats, sources
from kubetune import report as rpt
from kubetune.config import Config, DataConfig
from kubetune.errors import UserError

log = logging.getLogger(__name__)

# Bump when the same inputs and config would give different output files (normalisation, split rule, layout).
OUTPUT_VERSION = 1
_DETECT_SAMPLE = 20  # object rows looked at to detect a file's format
_DETECT_MAX_ROWS = 1000  # stop looking (and buffering) after this many rows, objects or not
_ERROR_LIST = 3  # bad rows quoted in the error message
_REPORT_EXAMPLES = 5  # examples per reason / duplicates quoted in the Markdown report
_PROGRESS_EVERY_S = 5.0
_COUNTS = ("rows_read", "rows_kept", "train_rows", "eval_rows", "bad_rows", "duplicates_removed")  # manifest


@dataclass
class _SourceStats:
    source: str
    role: str  # "train" (data.path) or "eval" (data.eval_path)
    kind: str
    format: str | None = None
    detected: bool = False
    rows_read: int = 0
    kept: int = 0
    duplicates: int = 0
    in_eval: int = 0
    bad: int = 0
    blank_lines: int = 0
    read: bool = True


@dataclass
class _BadRow:
    source: str
    unit: str
    row: int
    code: str
    reason: str

    @property
    def where(self) -> str:
        return f"{self.source} {self.unit} {self.row}"


# Characters that str.splitlines() and some JSON Lines readers take for line breaks although JSON does not;
# json escapes the ASCII ones itself, these three stay raw with ensure_ascii=False.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def jsonl_line(record: dict[str, Any]) -> bytes:
    """One JSON Lines record: UTF-8, readable text, and exactly one line break whatever splits the lines."""
    text = json.dumps(record, ensure_ascii=False)
    for char, escaped in _LINE_BREAKS.items():
        if char in text:
            text = text.replace(char, escaped)
    return text.encode("utf-8") + b"\n"


@dataclass
class _Pool:
    """Kept conversations of one side, spilled to a JSON Lines file; memory holds small per-row numbers."""

    path: Path
    ids: list[bytes] = field(default_factory=list)
    first: dict[bytes, int] = field(default_factory=dict)
    files: list[sources.SourceFile] = field(default_factory=list)
    file_of: array = field(default_factory=lambda: array("l"))  # index into `files`, per kept row
    row_of: array = field(default_factory=lambda: array("q"))
    turns: array = field(default_factory=lambda: array("l"))
    system: array = field(default_factory=lambda: array("b"))
    chars: array = field(default_factory=lambda: array("q"))
    user_chars: array = field(default_factory=lambda: array("q"))
    assistant_chars: array = field(default_factory=lambda: array("q"))

    def __post_init__(self) -> None:
        self.fh = open(self.path, "wb")  # noqa: SIM115 (closed when the pool's `with` block ends)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, digest: bytes, record: dict[str, Any], sf: sources.SourceFile) -> None:
        self.fh.write(jsonl_line(record))
        self.first.setdefault(digest, len(self.ids))
        self.ids.append(digest)
        if not self.files or self.files[-1] is not sf:
            self.files.append(sf)
        self.file_of.append(len(self.files) - 1)
        self.row_of.append(record["row"])
        messages = record["messages"]
        self.system.append(messages[0]["role"] == "system")
        self.turns.append(sum(m["role"] != "system" for m in messages))
        self.chars.append(sum(len(m["content"]) for m in messages))
        self.user_chars.append(sum(len(m["content"]) for m in messages if m["role"] == "user"))
        self.assistant_chars.append(sum(len(m["content"]) for m in messages if m["role"] == "assistant"))

    def where(self, i: int) -> str:
        sf = self.files[self.file_of[i]]
        return f"{sf.label} {sf.where(self.row_of[i])}"

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


@dataclass
class _Run:
    """Everything counted while reading, for the report and the error messages."""

    data: DataConfig
    stats: list[_SourceStats] = field(default_factory=list)
    bad: list[_BadRow] = field(default_factory=list)
    duplicate_examples: list[str] = field(default_factory=list)
    max_rows_stop: str | None = None
    rows_seen: int = 0
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)


# ----------------------------------------------------------------------------------------------------------
# The stage


def prepare(cfg: Config, out: str | Path, *, overwrite: bool = False) -> Path:
    """Read ``cfg.data``, write a prepared_dataset folder at ``out`` and return its path.

    Same inputs (file bytes or hub fingerprint) and data config -> same fingerprint -> a re-run is a no-op.
    Raises :class:`UserError` for bad input (missing file, unknown format, bad rows under
    ``on_bad_rows: error``, no usable rows) with a one-line message naming the file and row; nothing is
    left at ``out`` then.
    """
    data = cfg.data
    train_src = sources.resolve(data.path, key="data.path", split=data.split, revision=data.revision)
    eval_src = (
        sources.resolve(data.eval_path, key="data.eval_path", split=data.split, revision=data.revision)
        if data.eval_path
        else None
    )
    inputs = {"data": train_src.description}
    if eval_src is not None:
        inputs["eval_data"] = eval_src.description
    config = dataclasses.asdict(data)
    fp = artifacts.fingerprint("prepare", OUTPUT_VERSION, inputs, config)
    with artifacts.stage_output(out, "prepare", fp, inputs=inputs, config=config, overwrite=overwrite) as writer:
        if writer.up_to_date:
            return writer.out
        report = _build(data, train_src, eval_src, writer.tmp, inputs)
        artifacts.write_json(writer.tmp / "data_report.json", report)
        (writer.tmp / "data_report.md").write_text(render_markdown(report), encoding="utf-8")
        writer.counts.update({k: report["totals"][k] for k in _COUNTS})
    t = report["totals"]
    log.info(
        "prepare: %d rows read, %d kept -> %d train / %d eval (%d bad, %d duplicates) in %.1fs -> %s",
        t["rows_read"],
        t["rows_kept"],
        t["train_rows"],
        t["eval_rows"],
        t["bad_rows"],
        t["duplicates_removed"],
        report["seconds"],
        out,
    )
    return Path(out)


def _build(
    data: DataConfig,
    train_src: sources.Source,
    eval_src: sources.Source | None,
    tmp: Path,
    inputs: dict[str, Any],
) -> dict[str, Any]:
    run = _Run(data)
    eval_pool = None
    if eval_src is not None:
        eval_pool = _Pool(tmp / "eval.part")
        with eval_pool:
            _read(run, eval_src, "eval", eval_pool, exclude=None, cap=None)
    pool = _Pool(tmp / "rows.part")
    with pool:
        _read(
            run,
            train_src,
            "train",
            pool,
            exclude=eval_pool.first if eval_pool and data.dedupe else None,
            cap=data.max_rows,
        )

    if run.bad and data.on_bad_rows == "error":
        raise UserError(bad_rows_message(run.bad))
    if eval_pool is not None:
        _require_rows(run, eval_src, "eval", eval_pool)
    _require_rows(run, train_src, "train", pool)

    notes: list[str] = []
    if eval_pool is None:
        if data.eval_size > 0 and len(pool) < 2:
            dups = sum(st.duplicates for st in run.stats)
            raise UserError(
                f"{data.path}: only {len(pool)} usable row after removing duplicates and bad rows"
                f"{f' ({dups} duplicates)' if dups else ''}; a train/eval split needs at least 2 distinct rows "
                "(add rows, give data.eval_path, or set data.eval_size=0 to skip the held-out split)"
            )
        n_eval, note = eval_count(len(pool), data.eval_size)
        if note:
            notes.append(note)
            log.warning("prepare: %s", note)
        eval_idx = split(pool.ids, n_eval, data.seed)
        train_idx = [i for i in range(len(pool)) if i not in eval_idx]
        _write_split(pool, tmp / "train.jsonl", tmp / "eval.jsonl", eval_idx)
        train_view, eval_view = (pool, train_idx), (pool, sorted(eval_idx))
    else:
        _write_split(pool, tmp / "train.jsonl", None, set())
        eval_pool.path.replace(tmp / "eval.jsonl")
        train_view, eval_view = (pool, range(len(pool))), (eval_pool, range(len(eval_pool)))
    return _report(run, inputs, train_view, eval_view, notes)


def _read(
    run: _Run,
    source: sources.Source,
    role: str,
    pool: _Pool,
    *,
    exclude: dict[bytes, int] | None,
    cap: int | None,
) -> None:
    data = run.data
    for sf in source.files:
        st = _SourceStats(sf.label, role, sf.kind)
        run.stats.append(st)
        if run.max_rows_stop is not None:
            st.read = False
            continue
        rows = sf.rows()
        head, sample = _peek(rows)
        if data.format != "auto":
            st.format = data.format
        elif sample:
            _detect(sf, st, sample, head)
        for raw in _chain(head, rows):
            st.rows_read += 1
            _progress(run)
            if raw.error is None and st.format is None and isinstance(raw.value, dict):
                _detect(sf, st, [raw.value], [raw])  # the first object came after the detection window
            if raw.error is None:
                try:
                    messages = formats.normalise(st.format or "messages", raw.value, data.system_prompt)
                except formats.RowError as err:
                    raw.error = err
            if raw.error is not None:
                st.bad += 1
                run.bad.append(_BadRow(sf.label, sf.unit, raw.row, raw.error.code, raw.error.reason))
                continue
            text = formats.canonical(messages)
            digest = hashlib.sha1(text.encode("utf-8")).digest()
            if data.dedupe and digest in pool.first:
                st.duplicates += 1
                if len(run.duplicate_examples) < 50:
                    run.duplicate_examples.append(
                        f"{sf.label} {sf.where(raw.row)} repeats {pool.where(pool.first[digest])}"
                    )
                continue
            if exclude is not None and digest in exclude:
                st.in_eval += 1
                continue
            pool.add(
                digest,
                {
                    "id": digest.hex(),
                    "messages": messages,
                    "source": sf.label,
                    "row": raw.row,
                    "format": st.format,
                },
                sf,
            )
            st.kept += 1
            if cap is not None and len(pool) >= cap:
                run.max_rows_stop = where = pool.where(len(pool) - 1)
                log.info("prepare: data.max_rows=%d reached at %s; the rest of the data is not read", cap, where)
                break
        st.blank_lines, st.kind = sf.blank_lines, sf.kind  # kind: a .json file may turn out to be JSON Lines
        if st.rows_read == 0 and len(source.files) > 1:  # one empty file alone is the error _require_rows raises
            log.warning("prepare: %s holds no rows", sf.label)


def _detect(sf: sources.SourceFile, st: _SourceStats, sample: list[dict], head: list[sources.RawRow]) -> None:
    st.format, st.detected = formats.detect(sample), True
    if st.format is None:
        first = next(r for r in head if r.error is None and isinstance(r.value, dict))
        fields = ", ".join(formats.short(k, 24) for k in list(first.value)[:8]) or "none"
        raise UserError(
            f"{sf.label} {sf.where(first.row)}: cannot tell the row format from its fields "
            f"({fields}); {formats.FORMAT_HINT}; rename the fields or set data.format"
        )


def _peek(rows: Iterator[sources.RawRow]) -> tuple[list[sources.RawRow], list[dict]]:
    """Buffer the first rows of a file until enough objects are seen to detect its format."""
    head: list[sources.RawRow] = []
    sample: list[dict] = []
    for raw in rows:
        head.append(raw)
        if raw.error is None and isinstance(raw.value, dict):
            sample.append(raw.value)
        if len(sample) >= _DETECT_SAMPLE or len(head) >= _DETECT_MAX_ROWS:
            break
    return head, sample


def _chain(head: list[sources.RawRow], rest: Iterator[sources.RawRow]) -> Iterator[sources.RawRow]:
    buffered = deque(head)
    head.clear()
    while buffered:  # pop as we go so buffered rows are freed
        yield buffered.popleft()
    yield from rest


def _progress(run: _Run) -> None:
    run.rows_seen += 1
    if run.rows_seen % 1000:
        return
    now = time.monotonic()
    if now - run.last_progress >= _PROGRESS_EVERY_S:
        run.last_progress = now
        log.info("prepare: %d rows read (%.0f rows/s)", run.rows_seen, run.rows_seen / (now - run.started))


def _require_rows(run: _Run, source: sources.Source, role: str, pool: _Pool) -> None:
    if len(pool):
        return
    stats = [s for s in run.stats if s.role == role]
    read = sum(s.rows_read for s in stats)
    label = source.spec
    if read == 0:
        what = "the file is empty" if len(source.files) == 1 else f"its {len(source.files)} files are empty"
        raise UserError(f"{label}: no rows ({what}); point `data.{'eval_path' if role == 'eval' else 'path'}` at data")
    parts = [f"{read} read"]
    bad = [b for b in run.bad if b.source in {s.source for s in stats}]
    if bad:
        first = "; ".join(f"{_short_where(b, label)}: {b.reason}" for b in bad[:_ERROR_LIST])
        parts.append(f"{len(bad)} bad ({first})")
    dups = sum(s.duplicates for s in stats)
    if dups:
        parts.append(f"{dups} duplicates")
    in_eval = sum(s.in_eval for s in stats)
    if in_eval:
        parts.append(f"{in_eval} also in data.eval_path")
    raise UserError(f"{label}: no usable rows ({', '.join(parts)}); fix the data")


def _short_where(b: _BadRow, label: str) -> str:
    return f"{b.unit} {b.row}" if b.source == label else b.where


def bad_rows_message(bad: list[_BadRow]) -> str:
    """One line: the first bad rows with their places, the total, and what to do."""
    files = list(dict.fromkeys(b.source for b in bad))
    n = len(bad)
    noun = "bad row" if n == 1 else "bad rows"
    if len(files) == 1:
        listed = "; ".join(f"{b.unit} {b.row}: {b.reason}" for b in bad[:_ERROR_LIST])
        head = f"{files[0]}: {n} {noun}"
    else:
        listed = "; ".join(f"{b.where}: {b.reason}" for b in bad[:_ERROR_LIST])
        head = f"{n} {noun} in {len(files)} files"
    more = f"; and {n - _ERROR_LIST} more" if n > _ERROR_LIST else ""
    return f"{head} ({listed}{more}); fix them or set data.on_bad_rows=skip"


# ----------------------------------------------------------------------------------------------------------
# Split


def eval_count(n: int, eval_size: float) -> tuple[int, str | None]:
    """Eval rows for ``n`` kept rows: a fraction in (0, 1) (rounded, at least 1 when n >= 2) or a count;
    always leaves at least one training row. Returns the count, and a note when the request cannot be met."""
    if eval_size <= 0:
        return 0, None
    if n < 2:
        return 0, f"only {n} usable row: it goes to train and eval is empty (data.eval_size={eval_size:g})"
    wanted = max(1, math.floor(n * eval_size + 0.5)) if eval_size < 1 else int(eval_size)
    if wanted > n - 1:
        return n - 1, (
            f"data.eval_size={eval_size:g} asks for {wanted} eval rows but only {n} rows are usable; "
            f"using {n - 1} so that one row is left to train on"
        )
    return wanted, None


def split(ids: list[bytes], n_eval: int, seed: int) -> set[int]:
    """Indices of the ``n_eval`` rows whose seeded hash of their id is smallest (ties by position).

    Depends only on the ids, the count and the seed: stable across machines and runs, independent of row
    order.
    """
    if n_eval <= 0:
        return set()
    salt = f"kubetune-split:{seed}:".encode()
    keyed = sorted(range(len(ids)), key=lambda i: (hashlib.sha256(salt + ids[i]).digest()[:8], i))
    return set(keyed[:n_eval])


def _write_split(pool: _Pool, train_path: Path, eval_path: Path | None, eval_idx: set[int]) -> None:
    with open(pool.path, "rb") as src, open(train_path, "wb") as train:
        eval_fh = open(eval_path, "wb") if eval_path is not None else None  # noqa: SIM115
        try:
            for i, line in enumerate(src):
                (eval_fh if i in eval_idx else train).write(line)  # type: ignore[union-attr]
        finally:
            if eval_fh is not None:
                eval_fh.close()
    pool.path.unlink()


# ----------------------------------------------------------------------------------------------------------
# Report


def _describe(values: list[int]) -> dict[str, float | int]:
    if not values:
        return {"min": 0, "mean": 0, "p50": 0, "p95": 0, "max": 0}
    v = sorted(values)

    def rank(q: float) -> int:
        return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]

    return {"min": v[0], "mean": round(sum(v) / len(v), 1), "p50": rank(0.5), "p95": rank(0.95), "max": v[-1]}


def _side_stats(view: tuple[_Pool, Any]) -> dict[str, Any]:
    pool, idx = view
    idx = list(idx)
    return {
        "conversations": len(idx),
        "with_system_message": sum(pool.system[i] for i in idx),
        "turns": _describe([pool.turns[i] for i in idx]),
        "chars": _describe([pool.chars[i] for i in idx]),
        "user_chars": _describe([pool.user_chars[i] for i in idx]),
        "assistant_chars": _describe([pool.assistant_chars[i] for i in idx]),
    }


def _report(run: _Run, inputs: dict[str, Any], train_view, eval_view, notes: list[str]) -> dict[str, Any]:
    data = run.data
    by_reason: dict[str, dict[str, Any]] = {}
    for b in run.bad:
        entry = by_reason.setdefault(
            b.code, {"reason": formats.REASONS.get(b.code, b.code), "count": 0, "examples": []}
        )
        entry["count"] += 1
        if len(entry["examples"]) < _REPORT_EXAMPLES:
            entry["examples"].append(f"{b.where}: {b.reason}")
    per_format: dict[str, dict[str, int]] = {}
    for s in run.stats:
        f = per_format.setdefault(s.format or "unknown", {"rows_read": 0, "kept": 0})
        f["rows_read"] += s.rows_read
        f["kept"] += s.kept
    train, evals = _side_stats(train_view), _side_stats(eval_view)
    totals = {
        "rows_read": sum(s.rows_read for s in run.stats),
        "rows_kept": train["conversations"] + evals["conversations"],
        "train_rows": train["conversations"],
        "eval_rows": evals["conversations"],
        "bad_rows": len(run.bad),
        "duplicates_removed": sum(s.duplicates for s in run.stats),
        "removed_as_in_eval": sum(s.in_eval for s in run.stats),
    }
    return {
        "inputs": inputs,
        "totals": totals,
        "split": (
            {"method": "explicit eval file", "eval_path": data.eval_path}
            if data.eval_path
            else {
                "method": "seeded hash of the conversation id",
                "seed": data.seed,
                "eval_size": data.eval_size,
            }
        ),
        "policy": {
            "on_bad_rows": data.on_bad_rows,
            "dedupe": data.dedupe,
            "format": data.format,
            "system_prompt": data.system_prompt,
            "max_rows": data.max_rows,
        },
        "max_rows_reached_at": run.max_rows_stop,
        "notes": notes,
        "sources": [dataclasses.asdict(s) for s in run.stats],
        "formats": per_format,
        "bad_rows_by_reason": by_reason,
        "bad_rows": [
            {"source": b.source, "row": b.row, "unit": b.unit, "code": b.code, "reason": b.reason} for b in run.bad
        ],
        "duplicate_examples": run.duplicate_examples[: _REPORT_EXAMPLES * 4],
        "train": train,
        "eval": evals,
        "seconds": round(time.monotonic() - run.started, 3),
    }


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt_desc(d: dict[str, Any]) -> str:
    return f"{d['min']} / {d['p50']} / {d['p95']} / {d['max']} (mean {d['mean']})"


def render_markdown(report: dict[str, Any]) -> str:
    """The data report for people (``data_report.md``): :func:`build_report` rendered as Markdown."""
    return rpt.to_markdown(build_report(report))


def build_report(report: dict[str, Any]) -> rpt.Report:
    """The data report of ``data_report.json``'s content: what was read, what was kept, what was dropped and why."""
    t = report["totals"]
    sp = report["split"]
    how = (
        f"eval from `{_md(sp['eval_path'])}`"
        if "eval_path" in sp
        else f"seeded split: seed {sp['seed']}, eval_size {sp['eval_size']:g}"
    )
    facts = [
        f"bad rows: {t['bad_rows']} (`on_bad_rows: {report['policy']['on_bad_rows']}`)",
        f"exact duplicates removed: {t['duplicates_removed']}"
        + ("" if report["policy"]["dedupe"] else " (dedupe is off)"),
    ]
    if t["removed_as_in_eval"]:
        facts.append(f"training rows dropped because the eval file holds them: {t['removed_as_in_eval']}")
    if report["max_rows_reached_at"]:
        facts.append(
            f"`max_rows: {report['policy']['max_rows']}` reached at {_md(report['max_rows_reached_at'])}; "
            "the rest was not read"
        )
    facts += [f"note: {_md(n)}" for n in report["notes"]]
    sources = []
    for s in report["sources"]:
        fmt = (s["format"] or "-") + (" (detected)" if s["detected"] and s["format"] else "")
        read = s["rows_read"] if s["read"] else "not read"
        sources.append([f"`{_md(s['source'])}`", s["role"], fmt, read, s["kept"], s["duplicates"], s["bad"]])
    dropped: list[rpt.Block] = [rpt.Paragraph("None.")]
    if report["bad_rows_by_reason"]:
        reasons = sorted(report["bad_rows_by_reason"].values(), key=lambda e: -e["count"])
        dropped = [
            rpt.Table(
                ["reason", "count", "first examples"],
                [[e["reason"], e["count"], "<br>".join(_md(x) for x in e["examples"])] for e in reasons],
                ["left", "right", "left"],
            ),
            rpt.Paragraph("Every dropped row is listed in `data_report.json` (`bad_rows`)."),
        ]
    duplicates = [_md(e) for e in report["duplicate_examples"][:_REPORT_EXAMPLES]]
    tr, ev = report["train"], report["eval"]
    conversations = [
        ["conversations", tr["conversations"], ev["conversations"]],
        ["with a system message", tr["with_system_message"], ev["with_system_message"]],
        ["turns (min / p50 / p95 / max)", _fmt_desc(tr["turns"]), _fmt_desc(ev["turns"])],
        ["characters per conversation", _fmt_desc(tr["chars"]), _fmt_desc(ev["chars"])],
        ["user characters", _fmt_desc(tr["user_chars"]), _fmt_desc(ev["user_chars"])],
        ["assistant characters", _fmt_desc(tr["assistant_chars"]), _fmt_desc(ev["assistant_chars"])],
    ]
    counts = ["right"] * 4
    return rpt.Report(
        "Data report",
        [
            rpt.Paragraph(
                f"**{t['rows_read']} rows read, {t['rows_kept']} kept: "
                f"{t['train_rows']} train / {t['eval_rows']} eval** ({how})."
            ),
            rpt.Bullets(facts),
            rpt.Section(
                "Sources",
                [
                    rpt.Table(
                        ["source", "role", "format", "rows read", "kept", "duplicates", "bad"],
                        sources,
                        ["left", "left", "left", *counts],
                    )
                ],
            ),
            rpt.Section(
                "Formats",
                [
                    rpt.Table(
                        ["format", "rows read", "kept"],
                        [[f, v["rows_read"], v["kept"]] for f, v in report["formats"].items()],
                        ["left", "right", "right"],
                    )
                ],
            ),
            rpt.Section(f"Dropped rows ({t['bad_rows']})", dropped),
            rpt.Section(
                f"Duplicates removed ({t['duplicates_removed']})",
                [rpt.Bullets(duplicates) if duplicates else rpt.Paragraph("None.")],
            ),
            rpt.Section("Conversations", [rpt.Table(["", "train", "eval"], conversations)]),
        ],
    )
