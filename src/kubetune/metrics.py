"""Task metrics for generated answers against reference answers: exact match and ROUGE-L.

- Exact match is strict after normalisation: Unicode NFKC, case-folded, runs of whitespace collapsed to one space,
  leading/trailing whitespace removed. Nothing else is forgiven: a reference merely contained in the prediction, or
  equal to its first line, is *not* a match.
- ROUGE-L is the F1 of the longest common subsequence of tokens, from the pinned ``rouge-score`` package with
  Porter stemming (``use_stemmer=True``). Its tokenizer keeps only ASCII letters and digits (lower-cased), so
  punctuation does not count; a text with no such tokens scores 0.

Means over a list of rows are plain (each row weighs the same); an empty list gives ``None``, never 0, so "not
measured" is not mistaken for "always wrong".
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence


def normalize(text: str) -> str:
    """The form compared by exact match: NFKC, case-folded, whitespace collapsed and stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1]."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def mean_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    _check(predictions, references)
    if not references:
        return None
    return sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    _check(predictions, references)
    if not references:
        return None
    return sum(rouge_l(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)
