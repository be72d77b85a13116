"""Every stage's Markdown report, rendered through :mod:`kubetune.report`, equals its golden file; and the
renderer's own rules (headings, tables, alignment, blank lines)."""

from __future__ import annotations

import pytest
from report_cases import CASES, GOLDEN


@pytest.mark.parametrize("case", sorted(CASES))
def test_stage_reports_match_their_golden_files(case, tmp_path):
    golden = (GOLDEN / f"{case}.md").read_text(encoding="utf-8")
    assert CASES[case](tmp_path) == golden


def test_every_golden_file_has_a_case():
    assert {p.stem for p in GOLDEN.glob("*.md")} == set(CASES)


def test_the_renderer_writes_every_block_kind():
    from kubetune.report import Bullets, Facts, Paragraph, Quote, Report, Section, Table, to_markdown

    report = Report(
        "Title",
        [
            Paragraph("line one\nline two"),
            Bullets(["a", 2]),
            Bullets([]),  # an empty list leaves no blank lines behind
            Table(["", "n", "ok"], [["x", 1, ""], ["y", 22, "yes"]], ["left", "right", "center"]),
            Section("Part", [Facts([("k", "v")], header=("", "value")), Section("Sub", [Quote("q1\n\nq2")], level=3)]),
        ],
    )
    assert to_markdown(report) == (
        "# Title\n\nline one\nline two\n\n- a\n- 2\n\n"
        "| | n | ok |\n| --- | ---: | :---: |\n| x | 1 | |\n| y | 22 | yes |\n\n"
        "## Part\n\n| | value |\n| --- | --- |\n| k | v |\n\n### Sub\n\n> q1\n>\n> q2\n"
    )
    assert to_markdown(Report("Only a title")) == "# Only a title\n"


def test_a_table_row_of_the_wrong_width_is_refused():
    from kubetune.report import Report, Table, to_markdown

    with pytest.raises(ValueError, match="table row 1 has 1 cells for 2 columns"):
        to_markdown(Report("t", [Table(["a", "b"], [["1", "2"], ["3"]])]))
