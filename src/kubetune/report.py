"""One typed report for every stage (prepare, pack, evaluate, register, the pipeline's data check) and one
Markdown renderer.

A :class:`Report` is a title and a list of blocks: :class:`Paragraph`, :class:`Bullets`, :class:`Table`,
:class:`Facts` (a two-column key/value table), :class:`Quote` and :class:`Section` (a heading with blocks of its
own, nested to any level). :func:`to_markdown` renders it: ``# title``, then every block, one blank line between
blocks, and a single newline at the end. The stages write that text as ``data_report.md``, ``pack_report.md``,
``eval_report.md``; the KFP components copy it into ``Markdown`` artifacts. The JSON summaries the stages write
beside them (``data_report.json``, ``pack_report.json``, ``metrics.json``, ``registration.json``) are the
stages' own data and are not built from a Report.

Cells, items and paragraphs are written as given (``str()`` of the value): they are Markdown already, and each
stage escapes what it quotes from its inputs (a ``|`` in a table cell, a newline) in the way its report has always
shown it. No stage emits HTML, so there is no HTML renderer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Align = Literal["left", "right", "center"]
_RULE = {"left": "---", "right": "---:", "center": ":---:"}


@dataclass(frozen=True)
class Paragraph:
    """Text; lines inside it are kept (a paragraph of several lines renders without blank lines between)."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A ``- `` list, one item per entry."""

    items: Sequence[Any]


@dataclass(frozen=True)
class Quote:
    """A ``> `` block quote; every line quoted, an empty line as a bare ``>``."""

    text: str


@dataclass(frozen=True)
class Table:
    """A pipe table. ``align`` has one entry per column (missing entries are ``left``)."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    align: Sequence[Align] = ()


@dataclass(frozen=True)
class Facts:
    """Key/value pairs as a two-column table under the headings ``header`` (blank by default)."""

    items: Sequence[tuple[str, Any]]
    header: tuple[str, str] = ("", "")


@dataclass(frozen=True)
class Section:
    """A heading (``level`` 2 is ``##``) followed by its blocks."""

    title: str
    blocks: Sequence[Block] = field(default_factory=list)
    level: int = 2


Block = Paragraph | Bullets | Quote | Table | Facts | Section


@dataclass(frozen=True)
class Report:
    """A stage's report for people: a title (``# title``) and its blocks."""

    title: str
    blocks: Sequence[Block] = field(default_factory=list)


def _row(cells: Sequence[Any]) -> str:
    # An empty cell is `| |`, not `|  |`: the form every report has used.
    return "|" + "".join(f" {c} |" if str(c) != "" else " |" for c in cells)


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[Align]) -> str:
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"table row {i} has {len(row)} cells for {len(columns)} columns: {row!r}")
    rule = [_RULE[align[i] if i < len(align) else "left"] for i in range(len(columns))]
    return "\n".join([_row(columns), _row(rule), *(_row(r) for r in rows)])


def _block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Quote):
        return "\n".join("> " + line if line else ">" for line in block.text.splitlines() or [""])
    if isinstance(block, Table):
        return _table(block.columns, block.rows, block.align)
    if isinstance(block, Facts):
        return _table(block.header, block.items, ())
    if isinstance(block, Section):
        return _join([f"{'#' * block.level} {block.title}", *(_block(b) for b in block.blocks)])
    raise TypeError(f"not a report block: {block!r}")


def _join(parts: Sequence[str]) -> str:
    return "\n\n".join(p for p in parts if p)  # an empty list or paragraph leaves no blank lines behind


def to_markdown(report: Report) -> str:
    """The report as Markdown: ``# title``, the blocks separated by blank lines, one newline at the end."""
    return _join([f"# {report.title}", *(_block(b) for b in report.blocks)]) + "\n"
