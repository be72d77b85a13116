"""Representative inputs for every stage's Markdown report; ``tests/unit/reports/<case>.md`` holds each rendering.

The golden files were written by the renderers as they were before the stages shared :mod:`kubetune.report`
(``PYTHONPATH=src:. python tests/unit/report_cases.py`` writes them again from the current code; review the diff
before keeping it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).parent / "reports"

_SHA = "ab" * 32


def _prepared(tmp: Path, rows: list[Any], **data: Any) -> dict[str, Any]:
    from kubetune.config import from_dict
    from kubetune.prepare import prepare

    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / "data.jsonl"
    src.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    out = prepare(from_dict({"data": {"path": str(src), **data}}), tmp / "out")
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    return _portable(report, str(tmp))


def _portable(value: Any, root: str) -> Any:
    """The report with the temporary folder written as ``/data`` (goldens must not depend on where tests run)."""
    text = json.dumps(value).replace(root, "/data")
    return json.loads(text)


def _qa(i: int) -> dict[str, str]:
    return {"question": f"What is {i} + {i}?", "answer": str(2 * i)}


def data_clean(tmp: Path) -> str:
    from kubetune.prepare import render_markdown

    return render_markdown(_prepared(tmp, [_qa(i) for i in range(12)], eval_size=0.25))


def data_messy(tmp: Path) -> str:
    from kubetune.prepare import render_markdown

    rows = [_qa(i) for i in range(8)]
    rows += [_qa(1), _qa(2), {"question": "q"}, "{bad json", 5, {"question": "q|x", "answer": ["a|b"]}]
    rows += [{"messages": [{"role": "user", "content": "hi\nthere"}, {"role": "assistant", "content": "yo"}]}]
    report = _prepared(tmp, rows, on_bad_rows="skip", eval_size=0.2, format="auto")
    return render_markdown(report)


def data_explicit_eval(tmp: Path) -> str:
    from kubetune.prepare import render_markdown

    tmp.mkdir(parents=True, exist_ok=True)
    ev = tmp / "eval.jsonl"
    ev.write_text("".join(json.dumps(_qa(i)) + "\n" for i in range(3)), encoding="utf-8")
    report = _prepared(tmp, [_qa(i) for i in range(1, 9)], eval_path=str(ev), max_rows=6)
    return render_markdown(report)


def _pack_section(**over: Any) -> dict[str, Any]:
    none = {"count": 0, "listed": 0, "examples": []}
    section = {
        "examples_in": 10,
        "examples_out": 9,
        "tokens_in": 1234,
        "length_tokens": {"min": 12, "p50": 40, "p95": 120, "max": 130, "mean": 51.5},
        "truncated": dict(none),
        "dropped_too_long": dict(none),
        "dropped_no_loss": dict(none),
        "special_token_text": 0,
        "rows": 3,
        "tokens": 12345,
        "loss_tokens": 4000,
        "loss_token_fraction": 0.324,
        "packing_efficiency": 0.9613,
        "row_tokens": {"min": 100, "p50": 128, "p95": 128, "max": 128, "mean": 120.0},
        "packed": True,
    }
    section.update(over)
    return section


def _pack_report(train: dict[str, Any], ev: dict[str, Any], **over: Any) -> dict[str, Any]:
    report = {
        "template": {
            "source": "tokenizer",
            "name": None,
            "description": "the tokenizer's own chat template",
            "has_generation_markers": False,
            "mask_method": "prefix rendering",
            "sha256": _SHA,
        },
        "tokenizer": {
            "name_or_path": "org/Tiny-Model",
            "revision": "main",
            "vocab_size": 32000,
            "eos_token": "</s>",
            "pad_token": "</s>",
        },
        "max_length": 128,
        "loss_on": "assistant",
        "truncation": "drop",
        "packing": True,
        "train": train,
        "eval": ev,
        "seconds": 1.5,
        "tokens_per_second": 900,
    }
    report.update(over)
    return report


def pack_plain(tmp: Path) -> str:
    from kubetune.pack import _markdown

    return _markdown(_pack_report(_pack_section(), _pack_section(rows=1, tokens=345, packed=False)))


def pack_dropped(tmp: Path) -> str:
    from kubetune.pack import _markdown

    ex = [{"id": f"id{i}", "source": "/data/d.jsonl", "row": i, "tokens": 200 + i} for i in range(3)]
    train = _pack_section(
        truncated={"count": 5, "listed": 3, "examples": ex},
        dropped_too_long={"count": 2, "listed": 2, "examples": ex[:2]},
        special_token_text=4,
        packing_efficiency=0.5,
    )
    ev = _pack_section(dropped_no_loss={"count": 1, "listed": 1, "examples": ex[:1]}, packed=False, tokens=1234567)
    return _markdown(_pack_report(train, ev, truncation="right", packing=False, loss_on="all"))


def pack_empty_eval(tmp: Path) -> str:
    from kubetune.pack import _empty_section, _markdown

    ev = {
        **_empty_section(),
        "rows": 0,
        "tokens": 0,
        "loss_tokens": 0,
        "loss_token_fraction": 0.0,
        "packing_efficiency": 0.0,
        "row_tokens": {},
        "packed": False,
    }
    return _markdown(_pack_report(_pack_section(), ev))


def _metrics(**over: Any) -> dict[str, Any]:
    m = {
        "eval_loss": 1.2345,
        "base_eval_loss": 2.5,
        "eval_loss_delta": 1.2345 - 2.5,
        "eval_perplexity": 3.437,
        "base_eval_perplexity": 12.182,
        "exact_match": 0.5,
        "base_exact_match": 0.0,
        "rouge_l": 0.71,
        "base_rouge_l": 0.12,
        "eval_rows": 4,
        "eval_tokens": 40,
        "generation_rows": 2,
        "prompt_rows": 1,
    }
    m.update(over)
    return m


_CTX = {
    "base": "org/Tiny-Model",
    "adapter": "/data/adapter",
    "method": "lora",
    "dtype": "float32",
    "device": "cpu",
    "max_new_tokens": 32,
    "global_step": 7,
}


def _samples() -> list[dict[str, Any]]:
    return [
        {
            "kind": "heldout",
            "row": 3,
            "source": "/data/d.jsonl",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?\n\nsay it"}],
            "reference": "4",
            "base": "four | 4\nmaybe",
            "adapter": "4",
            "base_exact_match": False,
            "exact_match": True,
            "base_rouge_l": 0.0,
            "rouge_l": 1.0,
        },
        {
            "kind": "heldout",
            "row": 5,
            "source": "/data/d.jsonl",
            "messages": [{"role": "user", "content": "capital of France?"}],
            "reference": "Paris",
            "base": "",
            "adapter": "Lyon",
            "base_exact_match": False,
            "exact_match": False,
            "base_rouge_l": 0.25,
            "rouge_l": 0.0,
        },
        {
            "kind": "prompt",
            "row": 1,
            "source": "eval.prompts",
            "messages": [{"role": "user", "content": "Write a haiku."}],
            "reference": None,
            "base": "words",
            "adapter": "an old pond\na frog",
        },
    ]


def eval_full(tmp: Path) -> str:
    from kubetune.evaluation import render_report

    return render_report(_metrics(), _samples(), _CTX)


def eval_worse_no_generation(tmp: Path) -> str:
    from kubetune.evaluation import render_report

    m = _metrics(
        eval_loss=2.75,
        eval_loss_delta=0.25,
        generation_rows=0,
        prompt_rows=0,
        eval_perplexity=None,
        base_eval_perplexity=None,
    )
    return render_report(m, [], {**_CTX, "global_step": None, "method": "qlora", "dtype": "bfloat16"})


def eval_unchanged(tmp: Path) -> str:
    from kubetune.evaluation import render_report

    m = _metrics(eval_loss=2.5, eval_loss_delta=0.0, generation_rows=0, prompt_rows=1, eval_perplexity=12.182)
    return render_report(m, _samples()[2:], _CTX)


def _registration_markdown(info: dict[str, Any]) -> str:
    from components import runtime

    return runtime.registration_markdown(info)


def registration_registered(tmp: Path) -> str:
    return _registration_markdown(
        {
            "tracking_uri": "http://mlflow:5000",
            "experiment": "kubetune",
            "experiment_id": "1",
            "run_id": "abc123",
            "model_name": "kubetune-Tiny-Model",
            "version": "3",
            "promotion": "promoted",
            "promotion_reason": "eval_loss 1.2345 beats champion version 2 (1.5000) by 0.2655 (min_improvement 0.0000)",
            "champion_version": "3",
            "status": "registered",
            "kubetune_run_id": "f" * 64,
        }
    )


def registration_pending(tmp: Path) -> str:
    return _registration_markdown(
        {
            "status": "pending",
            "tracking_uri": "http://mlflow:5000",
            "experiment": "kubetune",
            "run_id": None,
            "model_name": "kubetune-Tiny-Model",
            "version": None,
            "promotion": None,
            "promotion_reason": None,
            "champion_version": None,
            "kubetune_run_id": "f" * 64,
            "error": "MLflow at http://mlflow:5000 unreachable (2 attempt(s); last error a | b)",
            "outbox": "outbox.json",
        }
    )


def registration_disabled(tmp: Path) -> str:
    return _registration_markdown({"status": "disabled", "tracking_uri": None, "kubetune_run_id": "f" * 64})


def _data_check(tmp: Path, champion: str | None, force: bool, accelerator: str) -> str:
    from components import runtime
    from kubetune import register
    from kubetune.artifacts import stage_output
    from kubetune.config import from_dict

    with stage_output(tmp / "prepared", "prepare", "a" * 64, inputs={}, config={}) as w:
        (w.tmp / "train.jsonl").write_text("{}\n")
    cfg = from_dict({"model": {"name_or_path": "org/Tiny-Model"}, "tracking": {"uri": "http://mlflow:5000"}})
    real = register.champion_data_fingerprint
    register.champion_data_fingerprint = lambda cfg: champion
    try:
        verdict, text = runtime.decide(cfg, tmp / "prepared", force=force, accelerator=accelerator)
    finally:
        register.champion_data_fingerprint = real
    return f"<!-- verdict: {verdict} -->\n" + text


def data_check_unchanged(tmp: Path) -> str:
    return _data_check(tmp, "a" * 64, False, "cpu")


def data_check_new_data(tmp: Path) -> str:
    return _data_check(tmp, "b" * 64, False, "gpu")


def data_check_no_champion(tmp: Path) -> str:
    return _data_check(tmp, None, False, "cpu")


def data_check_forced(tmp: Path) -> str:
    return _data_check(tmp, "a" * 64, True, "cpu")


CASES: dict[str, Callable[[Path], str]] = {
    f.__name__: f
    for f in (
        data_clean,
        data_messy,
        data_explicit_eval,
        pack_plain,
        pack_dropped,
        pack_empty_eval,
        eval_full,
        eval_worse_no_generation,
        eval_unchanged,
        registration_registered,
        registration_pending,
        registration_disabled,
        data_check_unchanged,
        data_check_new_data,
        data_check_no_champion,
        data_check_forced,
    )
}


if __name__ == "__main__":
    import tempfile

    GOLDEN.mkdir(exist_ok=True)
    for name, case in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            (GOLDEN / f"{name}.md").write_text(case(Path(tmp)), encoding="utf-8")
            print(name)
