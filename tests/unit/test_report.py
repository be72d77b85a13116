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
