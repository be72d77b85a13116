"""Reading raw datasets: local files and folders, and Hugging Face hub datasets.

:func:`resolve` turns ``data.path`` (or ``data.eval_path``) into a :class:`Source`: one or more
:class:`SourceFile` s, each a stream of :class:`RawRow` (row number + parsed value, or a row-level error),
plus a description for the manifest that pins the exact bytes read (sha256 of every file, or the hub
dataset's id, revision, split and fingerprint).

Local vs hub is decided without guessing: an existing path is local; a string that looks like a path
(starts with ``./``, ``../``, ``/`` or ``~``, holds a backslash or two slashes, or ends in a data file
extension) but does not exist is a "file not found" error; anything else shaped ``name`` or ``owner/name``
is a hub id.

Row numbers are 1-based: the physical line for JSON Lines, the record index for JSON, Parquet, CSV and hub
rows.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.artifacts import dir_digest, file_digest
from kubetune.errors import UserError
from kubetune.formats import RowError, clip, short, type_name

JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUFFIXES = (*JSONL_SUFFIXES, ".json", ".parquet", ".csv")
# Extensions that mark a string as a file path even when the file is missing (a typo is not sent to the hub).
_PATHLIKE_SUFFIXES = (
    *SUFFIXES,
    ".tsv",
    ".txt",
    ".arrow",
    ".xlsx",
    ".xls",
    ".yaml",
    ".yml",
    ".gz",
    ".bz2",
    ".xz",
    ".zst",
    ".zip",
    ".tar",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class RawRow:
    """One record as read: ``value`` when it parsed, else ``error``."""

    row: int
    value: Any = None
    error: RowError | None = None


@dataclass
class SourceFile:
    """One file (or one hub split): ``label`` names it in records, reports and errors."""

    label: str
    kind: str  # jsonl | json | parquet | csv | hub | saved
    unit: str  # "line" (JSON Lines) or "row"
    open_rows: Callable[[SourceFile], Iterator[RawRow]]
    blank_lines: int = 0

    def rows(self) -> Iterator[RawRow]:
        return self.open_rows(self)

    def where(self, row: int) -> str:
        return f"{self.unit} {row}"


@dataclass
class Source:
    """What ``data.path`` pointed at: the files to read in order, and their pinned identity."""

    spec: str
    files: list[SourceFile]
    description: dict[str, Any] = field(default_factory=dict)


def resolve(spec: str, *, key: str = "data.path", split: str = "train", revision: str | None = None) -> Source:
    """Decide local vs hub for ``spec`` and prepare the files to read (hub datasets are loaded here)."""
    spec = (spec or "").strip()
    if not spec:
        raise UserError(
            f"config key `{key}` is not set; point it at a .jsonl/.json/.parquet/.csv file, a folder "
            "of them, or a hub dataset id such as GAIR/lima"
        )
    path = Path(os.path.expanduser(spec))
    if path.exists():
        return _local(spec, path, key)
    if _looks_like_path(spec):
        raise UserError(
            f"{spec}: file not found (config key `{key}`); check the path (a hub dataset id looks like `owner/name`)"
        )
    if not _HUB_ID.match(spec):
        raise UserError(
            f"config key `{key}`: {spec!r} is neither an existing file or folder nor a hub dataset id like `owner/name`"
        )
    return _hub(spec, split=split, revision=revision, key=key)


def _looks_like_path(spec: str) -> bool:
    lowered = spec.lower()
    return (
        spec.startswith(("./", "../", "/", "~", ".\\"))
        or "\\" in spec
        or spec.count("/") > 1
        or lowered.endswith(_PATHLIKE_SUFFIXES)
    )


# ----------------------------------------------------------------------------------------------------------
# Local files


def _local(spec: str, path: Path, key: str) -> Source:
    if path.is_dir():
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return _saved(spec, path)
        files = sorted(
            (
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise UserError(
                f"{spec}: folder has no data files ({', '.join(SUFFIXES)}); point `{key}` at a folder "
                "that holds them, or at a file"
            )
        labels = [str(Path(spec) / p.relative_to(path)) for p in files]
    else:
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(
                f"{spec}: unsupported file type `{path.suffix or '(none)'}`; use "
                f"{', '.join(SUFFIXES)} (or a folder of them, or a hub dataset id)"
            )
        files, labels = [path], [spec]
    out, described = [], []
    for p, label in zip(files, labels, strict=True):
        try:
            digest, size = file_digest(p), p.stat().st_size
        except OSError as err:
            raise UserError(f"{label}: cannot read ({err.strerror or err}); check its permissions") from None
        described.append({"path": label, "sha256": digest, "bytes": size})
        out.append(_file(p, label))
    return Source(spec, out, {"kind": "local", "path": spec, "files": described})


def _file(path: Path, label: str) -> SourceFile:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return SourceFile(label, "jsonl", "line", lambda sf: _read_jsonl_file(path, sf))
    if suffix == ".json":
        return SourceFile(label, "json", "row", lambda sf: _read_json(path, sf))
    if suffix == ".parquet":
        return SourceFile(label, "parquet", "row", lambda sf: _read_parquet(path, sf))
    return SourceFile(label, "csv", "row", lambda sf: _read_csv(path, sf))


def _utf8_error(err: UnicodeDecodeError, line_offset: int) -> str:
    bad = err.object[err.start : err.start + 1]
    return f"not UTF-8 text (byte 0x{bad.hex()} at byte offset {line_offset + err.start} of the file)"


def _parse_json_line(raw: bytes, offset: int, lineno: int) -> RawRow | None:
    """One JSON Lines record; ``None`` for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return RawRow(lineno, error=RowError("not_utf8", _utf8_error(err, offset)))
    if lineno == 1:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None
    try:
        return RawRow(lineno, value=json.loads(text.rstrip("\r\n")))  # columns then count within the line
    except json.JSONDecodeError as err:
        return RawRow(
            lineno,
            error=RowError("invalid_json", f"not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno})"),
        )
    except RecursionError:
        return RawRow(lineno, error=RowError("invalid_json", "not valid JSON (nested too deeply)"))
    except ValueError as err:  # e.g. an integer longer than Python's digit limit
        return RawRow(lineno, error=RowError("invalid_json", f"not valid JSON ({clip(str(err), 80)})"))


def _iter_jsonl(lines: Iterable[bytes], sf: SourceFile) -> Iterator[RawRow]:
    # Binary lines, decoded one at a time: a bad byte is reported with its line and offset instead of failing
    # the whole file, and a huge line is held once as bytes and once as text, never the whole file.
    offset = 0
    for lineno, raw in enumerate(lines, start=1):
        parsed = _parse_json_line(raw, offset, lineno)
        offset += len(raw)
        if parsed is None:
            sf.blank_lines += 1
            continue
        yield parsed


def _read_jsonl_file(path: Path, sf: SourceFile) -> Iterator[RawRow]:
    with open(path, "rb") as fh:
        yield from _iter_jsonl(fh, sf)


def _read_json(path: Path, sf: SourceFile) -> Iterator[RawRow]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{sf.label} line {line}: {_utf8_error(err, 0)}; re-save the file as UTF-8") from None
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            # Several objects, one per line: JSON Lines saved under a .json name (common on the hub).
            sf.kind, sf.unit = "jsonl", "line"
            yield from _iter_jsonl(io.BytesIO(data), sf)
            return
        raise UserError(
            f"{sf.label} line {err.lineno} column {err.colno}: not valid JSON ({err.msg}); fix the "
            "file (one JSON list of objects, or JSON Lines in a .jsonl file)"
        ) from None
    except RecursionError:
        raise UserError(f"{sf.label}: not valid JSON (nested too deeply)") from None
    except ValueError as err:
        raise UserError(f"{sf.label}: not valid JSON ({clip(str(err), 80)})") from None
    if isinstance(value, dict):
        keys = ", ".join(short(k, 20) for k in list(value)[:5])
        raise UserError(
            f"{sf.label}: the top level is an object (keys {keys}), expected a list of row objects; "
            "unwrap the list or save the rows as JSON Lines (.jsonl)"
        )
    if not isinstance(value, list):
        raise UserError(f"{sf.label}: the top level is a {type_name(value)}, expected a list of row objects")
    for i, item in enumerate(value, start=1):
        yield RawRow(i, value=item)


def _read_parquet(path: Path, sf: SourceFile) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        index = 0
        for batch in pf.iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                index += 1
                yield RawRow(index, value=value)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{sf.label}: not a readable Parquet file ({clip(str(err), 120)})") from None


def _read_csv(path: Path, sf: SourceFile) -> Iterator[RawRow]:
    # A cell may span lines, so rows and physical lines differ: decode line by line (recording lines with bad
    # bytes) and map each record back to the physical lines it came from.
    bad_lines: dict[int, str] = {}

    def text_lines(fh) -> Iterator[str]:
        offset = 0
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad_lines[lineno] = _utf8_error(err, offset)
                text = raw.decode("utf-8", errors="replace")
            offset += len(raw)
            yield text.removeprefix("\ufeff") if lineno == 1 else text

    # LIMA-sized answers exceed csv's default 128 KiB cell limit; the limit is process-wide, only ever raised.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    with open(path, "rb") as fh:
        reader = csv.reader(text_lines(fh))
        try:
            header = next(reader, None)
            if header is None:
                return
            if bad_lines:
                raise UserError(f"{sf.label} line 1: {bad_lines[min(bad_lines)]} in the header; re-save as UTF-8")
            index, last_line = 0, reader.line_num
            for record in reader:
                first_line, last_line = last_line + 1, reader.line_num
                if not any(cell.strip() for cell in record):
                    sf.blank_lines += 1
                    continue
                index += 1
                bad = [ln for ln in range(first_line, last_line + 1) if ln in bad_lines]
                if bad:
                    yield RawRow(index, error=RowError("not_utf8", f"{bad_lines[bad[0]]} (line {bad[0]})"))
                elif len(record) != len(header):
                    yield RawRow(
                        index,
                        error=RowError(
                            "csv_fields",
                            f"has {len(record)} fields, the header has {len(header)} (line {last_line}; "
                            "an unquoted comma or quote?)",
                        ),
                    )
                else:
                    yield RawRow(index, value=dict(zip(header, record, strict=True)))
        except csv.Error as err:
            raise UserError(f"{sf.label} line {reader.line_num}: not valid CSV ({err})") from None


# ----------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _dataset_rows(ds) -> Callable[[SourceFile], Iterator[RawRow]]:
    def rows(sf: SourceFile) -> Iterator[RawRow]:
        for i, value in enumerate(ds, start=1):
            yield RawRow(i, value=value)

    return rows


def _hub(spec: str, *, split: str, revision: str | None, key: str) -> Source:
    import datasets
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    where = f"hub dataset `{spec}` (split `{split}`" + (f", revision `{revision}`)" if revision else ")")
    try:
        ds = datasets.load_dataset(spec, split=split, revision=revision, token=os.environ.get("HF_TOKEN"))
    except RevisionNotFoundError:
        raise UserError(f"{where}: revision not found; check `data.revision`") from None
    except (
        FileNotFoundError,
        RepositoryNotFoundError,
    ) as err:  # DatasetNotFoundError included: missing or gated
        raise UserError(
            f"{where}: not found or not accessible ({_first_line(err)}); check the id in `{key}`, and "
            "for a gated dataset (GAIR/lima is one) accept its terms on huggingface.co and set HF_TOKEN"
        ) from None
    except (ConnectionError, TimeoutError) as err:
        raise UserError(
            f"{where}: cannot reach the Hugging Face hub ({_first_line(err)}); check the network, or "
            f"download the files and point `{key}` at them"
        ) from None
    except ValueError as err:  # unknown split, malformed id, bad config name
        raise UserError(f"{where}: {_first_line(err)}; check `{key}` and `data.split`") from None
    if isinstance(ds, datasets.DatasetDict):  # a loader that ignored `split`; refuse rather than guess
        raise UserError(f"{where}: returned several splits ({', '.join(ds)}); set `data.split` to one of them")
    description = {
        "kind": "hub",
        "id": spec,
        "split": split,
        "revision": revision,
        "fingerprint": getattr(ds, "_fingerprint", None),
        "num_rows": len(ds),
    }
    return Source(spec, [SourceFile(spec, "hub", "row", _dataset_rows(ds))], description)


def _saved(spec: str, path: Path) -> Source:
    """A folder written by ``datasets.Dataset.save_to_disk``."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"{spec}: not a readable saved dataset ({_first_line(err)})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise UserError(f"{spec}: a saved DatasetDict ({', '.join(ds)}); point data.path at one split's folder")
    description = {"kind": "saved", "path": spec, "sha256": dir_digest(path), "num_rows": len(ds)}
    return Source(spec, [SourceFile(spec, "saved", "row", _dataset_rows(ds))], description)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return clip(lines[0]) if lines else type(err).__name__
