"""pack: prepared_dataset -> packed_dataset (chat template, loss masks, best-fit-decreasing packing).

``pack(cfg, prepared, out)`` reads ``train.jsonl`` and ``eval.jsonl`` of a prepared_dataset and writes:

- ``train/``: a ``datasets`` folder (``save_to_disk``) with columns ``input_ids``, ``labels`` (-100 where no
  loss) and ``seq_lengths`` (lengths of the examples packed into the row, summing to ``len(input_ids)``).
  Rows hold at most ``pack.max_length`` tokens and are not padded. The train stage batches them with
  :class:`kubetune.sft.PackedRowsCollator` (SFTTrainer with ``dataset_kwargs={"skip_prepare_dataset": True}``):
  rows stay ``[batch, longest row]`` and position ids restart at every example of a row (from ``seq_lengths``),
  so transformers builds a block-diagonal causal mask and packed examples never attend to each other; padding to
  the longest row carries no loss. With ``pack.packing: false`` every row is one example.
- ``eval/``: the same columns from ``eval.jsonl``, one example per row (never packed); empty when it is.
- ``tokenizer/``: the tokenizer (``save_pretrained``) carrying the chat template that was applied, so that
  train, evaluate and generate format prompts exactly as the data was formatted.
- ``pack_report.json``, ``pack_report.md``: example lengths (min/p50/p95/max), truncated and dropped examples
  (with ids), packing efficiency (real tokens / (rows x max_length)), rows, the share of tokens that carry
  loss, the template used.
- ``manifest.json`` (written by :func:`kubetune.artifacts.stage_output`).

Labels: with ``pack.loss_on: assistant`` a token carries loss when it overlaps the text of an assistant turn,
including the end-of-turn token that closes it (so the model learns to stop). Templates with
``{% generation %}`` markers say where that text is. For the others (most real ones) the conversation is
rendered prefix by prefix and each assistant turn's span is the text it adds, minus trailing whitespace; when
a template does not render prefixes consistently, each turn's content is located in the text instead. Spans
are character ranges mapped onto tokens through the tokenizer's offsets, so a tokenizer that merges characters
across a turn boundary cannot shift the mask (transformers' ``return_assistant_tokens_mask`` uses the same
rule). The first token of every example never carries loss: nothing precedes it, and in a packed row it would
otherwise be predicted from the previous example.

Truncation (``pack.truncation``): ``truncate`` keeps the first ``max_length`` tokens, ``drop`` drops the
example, ``error`` stops at the first one. An example left with no loss token is dropped and counted.

The output fingerprint covers the prepared dataset, ``pack.*`` except ``num_proc`` (it changes nothing in the
output) and the tokenizer (name, revision, vocabulary, special tokens, template text), so a re-run with the
same inputs is a no-op. Tokenisation runs in ``datasets.map`` worker processes and is cached in the
``datasets`` cache (``HF_DATASETS_CACHE``), keyed by the data, tokenizer, template and ``loss_on``: changing
``max_length``, the truncation policy or packing re-packs without tokenising again.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kubetune import report as rpt
from kubetune import templates
from kubetune.artifacts import fingerprint, read_manifest, stage_output, write_json
from kubetune.config import Config
from kubetune.errors import UserError

log = logging.getLogger(__name__)

# Bump when the output format or the tokenisation changes: it invalidates outputs and the tokenisation cache.
PACK_FORMAT = 1
# A worker process costs about a second to start and receive the tokenizer, while one process tokenises
# LIMA's 1022 conversations (690k tokens) in about a second: below this many examples per worker, fewer
# workers finish sooner.
MIN_EXAMPLES_PER_PROC = 4000
MAX_PROCS = 16
REPORT_MAX_IDS = 200  # examples listed by id per category in the report (all are counted)
MAP_BATCH = 256


def _features():
    from datasets import Features, List, Value

    ints = List(Value("int32"))
    return Features({"input_ids": ints, "labels": ints, "seq_lengths": ints})


def _map_features():
    from datasets import Features, List, Value

    ints = List(Value("int32"))
    return Features(
        {
            "input_ids": ints,
            "labels": ints,
            "control_text": Value("bool"),
            "id": Value("string"),
            "source": Value("string"),
            "row": Value("int64"),
        }
    )


# ----------------------------------------------------------------------------------------------------
# Assistant spans


def _render(
    conversations: list[list[dict]],
    template: str,
    special: dict[str, Any],
    *,
    add_generation_prompt: bool = False,
    spans: bool = False,
) -> tuple[list[str], list[list]]:
    from transformers.utils.chat_template_utils import render_jinja_template

    return render_jinja_template(
        conversations,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=spans,
        **special,
    )


def _prefix_spans(messages: list[dict], text: str, template: str, special: dict[str, Any]) -> list | None:
    """Assistant spans from prefix renders; None when the template renders prefixes inconsistently."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        (before,), _ = _render([messages[:i]], template, special, add_generation_prompt=True)
        if not text.startswith(before):
            # e.g. a generation prompt that primes the answer differently from how a finished turn opens
            return None
        if i == len(messages) - 1:
            through = text
        else:
            (through,), _ = _render([messages[: i + 1]], template, special)
        if not text.startswith(through) or len(through) < len(before):
            return None
        spans.append((len(before), len(through)))
    return spans


def _search_spans(messages: list[dict], text: str, end_markers: Sequence[str]) -> list | None:
    """Assistant spans found by locating each message's content in order, plus the added tokens (end-of-turn
    markers) that follow it directly. None when a message cannot be found."""
    spans, cursor = [], 0
    for message in messages:
        content = message["content"]
        pos = text.find(content, cursor)
        if pos < 0:  # templates often trim content
            content = content.strip()
            pos = text.find(content, cursor)
        if pos < 0:
            return None
        end = pos + len(content)
        if message["role"] == "assistant":
            while marker := next((m for m in end_markers if text.startswith(m, end)), None):
                end += len(marker)
            spans.append((pos, end))
        cursor = end
    return spans


def _trim(spans: list, text: str) -> list:
    """Drop trailing whitespace (the newline after an end-of-turn token) from each span."""
    out = []
    for start, end in spans:
        while end > start and text[end - 1].isspace():
            end -= 1
        out.append((start, end))
    return out


def span_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Which tokens overlap a character span.

    ``offsets``: (n, 2) character ranges of the tokens, in order; ``spans``: sorted, disjoint (start, end).
    """
    if len(spans) == 0 or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    k = np.searchsorted(sp[:, 1], offsets[:, 0], side="right")  # first span ending after the token starts
    inside = k < len(sp)
    k = np.minimum(k, len(sp) - 1)
    return inside & (offsets[:, 1] > sp[k, 0])


# ----------------------------------------------------------------------------------------------------
# Tokenisation (runs in datasets.map workers)


def _where(split_file: str, ex_id: Any, source: Any, row: Any) -> str:
    origin = f", {source} row {row}" if source is not None else ""
    return f"{split_file}: example {ex_id}{origin}"


def _conversation(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: `messages` is empty or not a list; re-run `kubetune prepare`")
    out = []
    for j, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise UserError(
                f"{where}: message {j} needs a `role` (system, user or assistant) and a string "
                "`content`; re-run `kubetune prepare`"
            )
        out.append({"role": role, "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise UserError(f"{where}: the conversation must end with an assistant message; re-run `kubetune prepare`")
    return out


def _tokenise_batch(
    batch: dict[str, list], *, tokenizer, template: str, markers: bool, loss_on: str, split_file: str
) -> dict[str, list]:
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    n = len(batch["messages"])
    ids_col, src_col, row_col = (batch.get(k, [None] * n) for k in ("id", "source", "row"))
    wheres = [_where(split_file, ids_col[i], src_col[i], row_col[i]) for i in range(n)]
    convs = [_conversation(m, wheres[i]) for i, m in enumerate(batch["messages"])]
    want_spans = loss_on == "assistant"
    try:
        texts, gen_spans = _render(convs, template, special, spans=want_spans and markers)
    except Exception:
        for i, conv in enumerate(convs):  # name the conversation the template refuses
            try:
                _render([conv], template, special)
            except Exception as err:
                raise UserError(
                    f"{wheres[i]}: the chat template cannot render it ({type(err).__name__}: "
                    f"{str(err)[:200]}); fix the data or set model.chat_template"
                ) from None
        raise
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=want_spans, return_attention_mask=False)
    added = sorted(tokenizer.added_tokens_encoder, key=len, reverse=True)
    control = re.compile("|".join(map(re.escape, added))) if added else None
    out: dict[str, list] = {k: [] for k in _map_features()}
    for i in range(n):
        ids = np.asarray(enc["input_ids"][i], dtype=np.int32)
        if want_spans:
            spans = gen_spans[i] if markers else None
            if not markers:
                try:
                    spans = _prefix_spans(convs[i], texts[i], template, special)
                except Exception:  # a template may refuse partial conversations; search instead
                    spans = None
                spans = spans if spans is not None else _search_spans(convs[i], texts[i], added)
                if spans is None:
                    raise UserError(
                        f"{wheres[i]}: cannot locate the assistant turns in the rendered chat; set "
                        "model.chat_template to a template with {% generation %} markers"
                    )
                spans = _trim(spans, texts[i])
            offsets = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
            labels = np.where(span_mask(offsets, spans), ids, np.int32(-100)).astype(np.int32)
        else:
            labels = ids.copy()
        if len(labels):
            labels[0] = -100
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["control_text"].append(control is not None and any(control.search(m["content"]) for m in convs[i]))
        out["id"].append(None if ids_col[i] is None else str(ids_col[i]))
        out["source"].append(None if src_col[i] is None else str(src_col[i]))
        out["row"].append(row_col[i])
    return out


def _load_split(path: Path):
    """The split as a datasets.Dataset backed by the datasets cache; None when the file holds no rows."""
    from datasets import Dataset

    if not path.is_file():
        raise UserError(f"{path}: missing from the prepared dataset; re-run `kubetune prepare`")
    with open(path, "rb") as fh:
        if not any(line.strip() for line in fh):
            return None
    try:
        ds = Dataset.from_json(str(path))
    except Exception as err:  # arrow's JSON reader raises several types
        raise UserError(
            f"{path}: not a prepared JSONL file ({type(err).__name__}: {str(err)[:200]}); re-run `kubetune prepare`"
        ) from None
    if "messages" not in ds.column_names:
        raise UserError(f"{path}: rows have no `messages` field; re-run `kubetune prepare`")
    return ds


def num_proc(requested: int, examples: int) -> int:
    """Tokenisation processes: ``requested`` (at most one per example), or, for 0, one per
    MIN_EXAMPLES_PER_PROC examples, bounded by the usable cores and MAX_PROCS."""
    if requested:
        return max(1, min(requested, examples))
    from kubetune.hardware import usable_cores

    return max(1, min(usable_cores(), MAX_PROCS, examples // MIN_EXAMPLES_PER_PROC))


@dataclass
class _Tokenised:
    """A tokenised split as flat arrays."""

    ids: np.ndarray  # every example's tokens, concatenated
    labels: np.ndarray
    starts: np.ndarray  # where each example starts in ids
    full: np.ndarray  # each example's length before truncation
    control: np.ndarray  # messages contain special-token text
    meta: dict[str, list]  # id, source, row


def _tokenise(
    ds, *, tokenizer, template: templates.ChatTemplate, cfg: Config, split: str, split_file: str, key: str
) -> _Tokenised:
    import pyarrow.compute as pc

    procs = num_proc(cfg.pack.num_proc, len(ds))
    log.info("tokenising %s: %d examples, %d process%s", split_file, len(ds), procs, "es" * (procs > 1))
    # An explicit cache key: datasets' hash of the tokenizer object changes after its first call.
    new_fp = fingerprint(ds._fingerprint, key, cfg.pack.loss_on)[:40]
    done = ds.map(
        _tokenise_batch,
        batched=True,
        batch_size=MAP_BATCH,
        num_proc=procs if procs > 1 else None,
        remove_columns=ds.column_names,
        features=_map_features(),
        new_fingerprint=new_fp,
        desc=f"pack: tokenising {split}",
        fn_kwargs={
            "tokenizer": tokenizer,
            "template": template.text,
            "markers": template.has_generation_markers,
            "loss_on": cfg.pack.loss_on,
            "split_file": split_file,
        },
    )
    t = done.data
    full = pc.list_value_length(t.column("input_ids")).to_numpy().astype(np.int64)
    return _Tokenised(
        ids=pc.list_flatten(t.column("input_ids")).to_numpy(),
        labels=pc.list_flatten(t.column("labels")).to_numpy(),
        starts=np.cumsum(full) - full,
        full=full,
        control=t.column("control_text").to_numpy(zero_copy_only=False),
        meta={k: t.column(k).to_pylist() for k in ("id", "source", "row")},
    )


# ----------------------------------------------------------------------------------------------------
# Truncation and packing


def _listed(tk: _Tokenised, idx: np.ndarray) -> dict[str, Any]:
    shown = idx[:REPORT_MAX_IDS]
    examples = [
        {
            "id": tk.meta["id"][i],
            "source": tk.meta["source"][i],
            "row": tk.meta["row"][i],
            "tokens": int(tk.full[i]),
        }
        for i in shown
    ]
    return {"count": len(idx), "listed": len(shown), "examples": examples}


def _select(tk: _Tokenised, cfg: Config, split_file: str, *, is_train: bool):
    """Apply the truncation policy and drop examples without loss tokens.

    Returns (kept example indices, every example's length after truncation, report section).
    """
    max_length, policy = cfg.pack.max_length, cfg.pack.truncation
    too_long = np.flatnonzero(tk.full > max_length)
    if policy == "error" and len(too_long):
        i = int(too_long[0])
        where = _where(split_file, tk.meta["id"][i], tk.meta["source"][i], tk.meta["row"][i])
        raise UserError(
            f"{where}: {tk.full[i]} tokens > pack.max_length={max_length} ({len(too_long)} examples "
            "in all); raise pack.max_length or set pack.truncation to truncate or drop"
        )
    lengths = np.minimum(tk.full, max_length)
    carries = np.concatenate([[0], np.cumsum(tk.labels != -100)])
    loss = carries[tk.starts + lengths] - carries[tk.starts]
    dropped = too_long if policy == "drop" else np.zeros(0, dtype=np.int64)
    usable = np.ones(len(tk.full), dtype=bool)
    usable[dropped] = False
    no_loss = np.flatnonzero(usable & (loss == 0))
    usable[no_loss] = False
    kept = np.flatnonzero(usable)
    if is_train and len(kept) == 0:
        n = len(tk.full)
        if len(dropped) == n:
            raise UserError(
                f"{split_file}: all {n} examples are longer than pack.max_length={max_length} "
                f"(shortest: {int(tk.full.min())} tokens); raise pack.max_length or set "
                "pack.truncation: truncate"
            )
        raise UserError(
            f"{split_file}: none of the {n} examples carries loss within pack.max_length="
            f"{max_length} tokens ({len(dropped)} dropped as too long, {len(no_loss)} with no "
            "assistant token left); raise pack.max_length or set pack.loss_on: all"
        )
    section = {
        "examples_in": len(tk.full),
        "examples_out": len(kept),
        "tokens_in": int(tk.full.sum()),
        "length_tokens": _lengths_summary(tk.full),
        "truncated": _listed(tk, too_long if policy == "truncate" else np.zeros(0, dtype=np.int64)),
        "dropped_too_long": _listed(tk, dropped),
        "dropped_no_loss": _listed(tk, no_loss),
        "special_token_text": int(tk.control.sum()),
    }
    return kept, lengths, section


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of total length <= ``capacity`` by best fit decreasing; deterministic.

    Examples go longest first (ties: lower index first), each into the open bin with the least room that still
    fits it (ties: the lowest bin), else into a new bin. Open bins are indexed by their room, so a placement
    costs a bisect instead of a scan over all bins.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room -> heap of bin numbers
    rooms: list[int] = []  # sorted rooms that have at least one open bin
    for i in order:
        need = int(lengths[i])
        if not 1 <= need <= capacity:
            raise ValueError(f"example {i} has length {need}, outside 1..{capacity}")
        k = bisect.bisect_left(rooms, need)
        if k < len(rooms):
            room = rooms[k]
            b = heapq.heappop(by_room[room])
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:
            b, room = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        left = room - need
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            heapq.heappush(by_room[left], b)
    return bins


def _rows_table(tk: _Tokenised, lengths: np.ndarray, rows: list[list[int]]):
    """An arrow table of ``rows``: each row is its examples' (truncated) tokens concatenated, in order."""
    import pyarrow as pa

    members = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=sum(map(len, rows)))
    seq = lengths[members]
    out_start = np.cumsum(seq) - seq
    gather = np.repeat(tk.starts[members] - out_start, seq) + np.arange(int(seq.sum()), dtype=np.int64)
    seq_offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    tok_offsets = pa.array(np.concatenate([[0], np.cumsum(seq)]).astype(np.int32)[seq_offsets])
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(tok_offsets, pa.array(tk.ids[gather].astype(np.int32))),
            "labels": pa.ListArray.from_arrays(tok_offsets, pa.array(tk.labels[gather].astype(np.int32))),
            "seq_lengths": pa.ListArray.from_arrays(
                pa.array(seq_offsets.astype(np.int32)), pa.array(seq.astype(np.int32))
            ),
        }
    )


def _build_dataset(tk: _Tokenised | None, lengths: np.ndarray | None, rows: list[list[int]], max_length: int):
    """The output Dataset; ``rows`` lists example indices, in the order their tokens are concatenated."""
    import pyarrow as pa
    from datasets import Dataset

    features = _features()
    if not rows:
        return Dataset.from_dict({k: [] for k in features}, features=features)
    per_table = max(1, 2**30 // max_length)  # arrow list offsets are int32
    tables = [_rows_table(tk, lengths, rows[c : c + per_table]) for c in range(0, len(rows), per_table)]
    ds = Dataset(pa.concat_tables(tables))
    return ds if ds.features == features else ds.cast(features)


# ----------------------------------------------------------------------------------------------------
# Report


def _lengths_summary(lengths: np.ndarray) -> dict[str, Any]:
    if len(lengths) == 0:
        return {"min": 0, "p50": 0, "p95": 0, "max": 0, "mean": 0.0}
    p50, p95 = np.percentile(lengths, [50, 95], method="nearest")
    return {
        "min": int(lengths.min()),
        "p50": int(p50),
        "p95": int(p95),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 1),
    }


def _dataset_stats(ds, max_length: int) -> dict[str, Any]:
    import pyarrow.compute as pc

    if len(ds) == 0:
        return {
            "rows": 0,
            "tokens": 0,
            "loss_tokens": 0,
            "loss_token_fraction": 0.0,
            "packing_efficiency": 0.0,
            "row_tokens": _lengths_summary(np.zeros(0)),
        }
    row_tokens = pc.list_value_length(ds.data.column("input_ids")).to_numpy()
    tokens = int(row_tokens.sum())
    loss_tokens = int(pc.sum(pc.not_equal(pc.list_flatten(ds.data.column("labels")), -100)).as_py() or 0)
    return {
        "rows": len(ds),
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "loss_token_fraction": round(loss_tokens / tokens, 4),
        "packing_efficiency": round(tokens / (len(ds) * max_length), 4),
        "row_tokens": _lengths_summary(row_tokens),
    }


def _empty_section() -> dict[str, Any]:
    none = {"count": 0, "listed": 0, "examples": []}
    return {
        "examples_in": 0,
        "examples_out": 0,
        "tokens_in": 0,
        "length_tokens": _lengths_summary(np.zeros(0)),
        "truncated": dict(none),
        "dropped_too_long": dict(none),
        "dropped_no_loss": dict(none),
        "special_token_text": 0,
    }


def _markdown(report: dict[str, Any]) -> str:
    """``pack_report.md``: :func:`build_report` rendered as Markdown."""
    return rpt.to_markdown(build_report(report))


def build_report(report: dict[str, Any]) -> rpt.Report:
    """The pack report of ``pack_report.json``'s content: template, tokenizer, settings, a train/eval table of
    counts and lengths, then the examples truncated or dropped (by id) and special-token text found."""
    tpl, tk = report["template"], report["tokenizer"]
    tr, ev = report["train"], report["eval"]
    table = [
        ("examples in", lambda s: s["examples_in"]),
        ("examples kept", lambda s: s["examples_out"]),
        ("rows", lambda s: s["rows"]),
        ("tokens", lambda s: f"{s['tokens']:,}"),
        (
            "example length min / p50 / p95 / max",
            lambda s: "{min} / {p50} / {p95} / {max}".format(**s["length_tokens"]),
        ),
        ("truncated", lambda s: s["truncated"]["count"]),
        ("dropped: too long", lambda s: s["dropped_too_long"]["count"]),
        ("dropped: no loss tokens", lambda s: s["dropped_no_loss"]["count"]),
        ("tokens carrying loss", lambda s: f"{100 * s['loss_token_fraction']:.1f}%"),
        (
            "packing efficiency",
            lambda s: f"{100 * s['packing_efficiency']:.1f}%" if s["packed"] else "not packed",
        ),
    ]
    blocks: list[rpt.Block] = [
        rpt.Bullets(
            [
                f"template: {tpl['description']} (loss mask from {tpl['mask_method']})",
                f"tokenizer: `{tk['name_or_path']}` (vocabulary {tk['vocab_size']})",
                f"max_length {report['max_length']}, loss on {report['loss_on']} tokens, truncation "
                f"`{report['truncation']}`, packing {'on' if report['packing'] else 'off'}",
            ]
        ),
        rpt.Table(
            ["", "train", "eval"],
            [[label, cell(tr), cell(ev)] for label, cell in table],
            ["left", "right", "right"],
        ),
    ]
    for name, sec in (("train", tr), ("eval", ev)):
        for key, title in (
            ("truncated", "truncated"),
            ("dropped_too_long", "dropped (too long)"),
            ("dropped_no_loss", "dropped (no loss tokens)"),
        ):
            entry = sec[key]
            if entry["count"]:
                more = f" (first {entry['listed']})" if entry["listed"] < entry["count"] else ""
                examples = [
                    f"`{e['id']}` {e['source']} row {e['row']}: {e['tokens']} tokens" for e in entry["examples"]
                ]
                blocks.append(rpt.Section(f"{name}: {entry['count']} {title}{more}", [rpt.Bullets(examples)]))
        if sec["special_token_text"]:
            blocks.append(
                rpt.Paragraph(
                    f"{name}: {sec['special_token_text']} examples contain special-token text in their "
                    "messages; it is tokenised as the special token."
                )
            )
    return rpt.Report("Pack report", blocks)


# ----------------------------------------------------------------------------------------------------
# The stage


def tokenizer_identity(cfg: Config, tokenizer, template: templates.ChatTemplate) -> dict[str, Any]:
    """What determines the tokens: name, revision, vocabulary, special tokens, template text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab_digest = hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else None
    return {
        "name_or_path": cfg.model.name_or_path,
        "revision": cfg.model.revision,
        "vocab_size": len(tokenizer),
        "tokenizer_sha256": vocab_digest,
        "special_tokens": {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
        "chat_template_sha256": hashlib.sha256(template.text.encode()).hexdigest(),
        "chat_template_source": template.source,
    }


def pack(cfg: Config, prepared: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Tokenise, mask and pack the prepared_dataset ``prepared`` into a packed_dataset at ``out``.

    See the module docstring for the output layout. Bad input raises UserError naming the file and example.
    """
    from kubetune.models import load_tokenizer

    prepared, out = Path(prepared), Path(out)
    started = time.perf_counter()
    manifest = read_manifest(prepared, "prepare")
    tokenizer = load_tokenizer(cfg.model)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"model {cfg.model.name_or_path!r}: its tokenizer has no fast (Rust) version, which "
            "pack needs for token offsets; convert it with `tokenizers` or use another model"
        )
    template = templates.choose(tokenizer, cfg.model.chat_template, cfg.pack.fallback_template)
    tokenizer.chat_template = template.text
    identity = tokenizer_identity(cfg, tokenizer, template)
    pack_cfg = {k: v for k, v in asdict(cfg.pack).items() if k != "num_proc"}
    fp = fingerprint("pack", PACK_FORMAT, manifest.get("fingerprint"), pack_cfg, identity)
    inputs = {
        "prepared": {"path": str(prepared.resolve()), "fingerprint": manifest.get("fingerprint")},
        "tokenizer": identity,
    }
    config = {
        "pack": asdict(cfg.pack),
        "model": {"name_or_path": cfg.model.name_or_path, "revision": cfg.model.revision},
    }
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < cfg.pack.max_length:
        log.warning(
            "pack.max_length=%d exceeds the tokenizer's model_max_length=%d; examples that long go "
            "beyond the context the model was trained on",
            cfg.pack.max_length,
            model_max,
        )

    with stage_output(out, "pack", fp, inputs=inputs, config=config, overwrite=overwrite) as w:
        if w.up_to_date:
            return out
        mask_method = (
            "all tokens"
            if cfg.pack.loss_on == "all"
            else "{% generation %} markers"
            if template.has_generation_markers
            else "prefix rendering"
        )
        log.info(
            "pack: template %s, loss on %s tokens (%s), max_length %d",
            template.describe(),
            cfg.pack.loss_on,
            mask_method,
            cfg.pack.max_length,
        )
        report: dict[str, Any] = {
            "template": {
                "source": template.source,
                "name": template.name,
                "description": template.describe(),
                "has_generation_markers": template.has_generation_markers,
                "mask_method": mask_method,
                "sha256": identity["chat_template_sha256"],
            },
            "tokenizer": {
                "name_or_path": cfg.model.name_or_path,
                "revision": cfg.model.revision,
                "vocab_size": len(tokenizer),
                "eos_token": tokenizer.eos_token,
                "pad_token": tokenizer.pad_token,
            },
            "max_length": cfg.pack.max_length,
            "loss_on": cfg.pack.loss_on,
            "truncation": cfg.pack.truncation,
            "packing": cfg.pack.packing,
        }
        key = fingerprint(PACK_FORMAT, identity)
        for split in ("train", "eval"):
            split_file = str(prepared / f"{split}.jsonl")
            raw = _load_split(prepared / f"{split}.jsonl")
            if raw is None and split == "train":
                raise UserError(f"{split_file}: no training examples; check the data and re-run `kubetune prepare`")
            if raw is None:
                ds, section = _build_dataset(None, None, [], cfg.pack.max_length), _empty_section()
            else:
                tk = _tokenise(
                    raw,
                    tokenizer=tokenizer,
                    template=template,
                    cfg=cfg,
                    split=split,
                    split_file=split_file,
                    key=key,
                )
                kept, lengths, section = _select(tk, cfg, split_file, is_train=split == "train")
                if split == "train" and cfg.pack.packing:
                    bins = best_fit_decreasing(lengths[kept].tolist(), cfg.pack.max_length)
                    rows = [[int(kept[j]) for j in b] for b in bins]
                else:
                    rows = [[int(i)] for i in kept]
                ds = _build_dataset(tk, lengths, rows, cfg.pack.max_length)
            # An empty dataset saved with the default (0 shards) cannot be loaded back; one empty shard can.
            ds.save_to_disk(str(w.tmp / split), num_shards=1 if len(ds) == 0 else None)
            section.update(_dataset_stats(ds, cfg.pack.max_length), packed=split == "train" and cfg.pack.packing)
            report[split] = section
            _warn(split_file, section)
        tokenizer.save_pretrained(str(w.tmp / "tokenizer"))
        seconds = time.perf_counter() - started
        tokens_in = report["train"]["tokens_in"] + report["eval"]["tokens_in"]
        report["seconds"] = round(seconds, 2)
        report["tokens_per_second"] = round(tokens_in / seconds)
        write_json(w.tmp / "pack_report.json", report)
        (w.tmp / "pack_report.md").write_text(_markdown(report), encoding="utf-8")
        tr, ev = report["train"], report["eval"]
        w.counts.update(
            {
                "train_examples": tr["examples_out"],
                "train_rows": tr["rows"],
                "train_tokens": tr["tokens"],
                "eval_rows": ev["rows"],
                "eval_tokens": ev["tokens"],
                "truncated": tr["truncated"]["count"] + ev["truncated"]["count"],
                "dropped": sum(s[k]["count"] for s in (tr, ev) for k in ("dropped_too_long", "dropped_no_loss")),
            }
        )
        w.extra["template"] = template.describe()
        log.info(
            "pack: %d train examples -> %d rows of <= %d tokens (packing efficiency %.1f%%, %.1f%% of "
            "tokens carry loss), %d truncated, %d dropped; %d eval rows; template %s; %.1f s, %d tokens/s",
            tr["examples_out"],
            tr["rows"],
            cfg.pack.max_length,
            100 * tr["packing_efficiency"],
            100 * tr["loss_token_fraction"],
            w.counts["truncated"],
            w.counts["dropped"],
            ev["rows"],
            template.describe(),
            seconds,
            report["tokens_per_second"],
        )
    return out


def _warn(split_file: str, section: dict[str, Any]) -> None:
    for key, what in (
        ("truncated", "truncated to pack.max_length"),
        ("dropped_too_long", "dropped as longer than pack.max_length"),
        ("dropped_no_loss", "dropped with no loss token left after truncation"),
    ):
        if section[key]["count"]:
            log.warning("%s: %d examples %s (listed in pack_report.json)", split_file, section[key]["count"], what)
    if section["special_token_text"]:
        log.warning(
            "%s: %d examples contain special-token text in their messages; it is tokenised as the special token",
            split_file,
            section["special_token_text"],
        )
    if section["examples_in"] and not section["examples_out"]:
        log.warning("%s: no example survived truncation; this split is empty", split_file)


def load_report(packed: str | Path) -> dict[str, Any]:
    """The pack report of a complete packed_dataset (for evaluate and register)."""
    read_manifest(packed, "pack")
    return json.loads((Path(packed) / "pack_report.json").read_text(encoding="utf-8"))
