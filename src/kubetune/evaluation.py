"""evaluate: the adapter against its own base model, on the same held-out rows (adapter + data -> eval_report).

Loss: the token-weighted mean cross-entropy over exactly the tokens the training loss uses (``labels != -100`` in
``<packed>/eval``, the held-out conversations tokenised and masked like the training rows), for the first
``eval.max_rows`` examples. Base and adapter come from the same loaded weights and see identical batches: the base
first, with the adapter switched off (``PeftModel.disable_adapter()``, exact), then the adapter, merged into the
weights (the same function, faster; a quantised QLoRA base is left unmerged). Rows are right-padded with an
attention mask; a row holding several packed examples (``seq_lengths``) is split into them, since packed examples
never see each other. Perplexity is ``exp(loss)``.

Generation: the first ``eval.num_samples`` held-out conversations of ``<prepared>/eval.jsonl`` (prompt = every message
before the final assistant answer, formatted with ``<packed>/tokenizer``'s chat template) plus the fixed
``eval.prompts``; greedy, ``eval.max_new_tokens``, base and adapter side by side. Exact match and ROUGE-L F1
(:mod:`kubetune.metrics`) against the held-out answers.

Output folder::

    metrics.json     eval_loss, base_eval_loss, eval_loss_delta (adapter - base; negative = better),
                     eval_perplexity, base_eval_perplexity, exact_match, base_exact_match, rouge_l, base_rouge_l
                     (null when no held-out row was generated for), eval_rows, eval_tokens, generation_rows,
                     prompt_rows, eval_seconds, generation_seconds
    samples.jsonl    one line per prompt: kind (heldout|prompt), id, source, row, messages, reference, base,
                     adapter, and per-row exact match / ROUGE-L for both
    eval_report.md   the comparison for people: headline table, then every sample side by side
    manifest.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from kubetune import generation
from kubetune import metrics as task_metrics
from kubetune import report as rpt
from kubetune.artifacts import fingerprint, read_json, read_manifest, stage_output, write_json
from kubetune.config import Config
from kubetune.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------------------
# Inputs


def load_eval_examples(packed: Path, max_rows: int) -> list[tuple[list[int], list[int]]]:
    """The first ``max_rows`` held-out examples of ``<packed>/eval`` as ``(input_ids, labels)`` pairs."""
    eval_dir = packed / "eval"
    no_rows = (
        f"{eval_dir}: no held-out rows to score; set `data.eval_size` > 0 or `data.eval_path`, then re-run "
        "`kubetune prepare` and `kubetune pack`"
    )
    if not eval_dir.is_dir():
        raise UserError(no_rows)
    from datasets import load_from_disk

    try:  # an empty dataset is saved with no shards, and datasets cannot load that back
        if json.loads((eval_dir / "state.json").read_text()).get("_data_files") == []:
            raise UserError(no_rows)
    except (OSError, ValueError):
        pass
    try:
        ds = load_from_disk(str(eval_dir))
    except (OSError, ValueError, FileNotFoundError) as err:
        raise UserError(f"{eval_dir}: not a readable dataset ({err}); re-run `kubetune pack`") from None
    missing = [c for c in ("input_ids", "labels") if c not in ds.column_names]
    if missing:
        raise UserError(f"{eval_dir}: missing column(s) {', '.join(missing)}; re-run `kubetune pack`")
    ds = ds.select(range(min(len(ds), max_rows)))
    cols = ds.to_dict()
    seq_lengths = cols.get("seq_lengths") or [None] * len(ds)
    examples: list[tuple[list[int], list[int]]] = []
    for row, (ids, labels, lengths) in enumerate(zip(cols["input_ids"], cols["labels"], seq_lengths, strict=True)):
        if len(ids) != len(labels):
            raise UserError(f"{eval_dir} row {row}: input_ids and labels differ in length; re-run `kubetune pack`")
        if not lengths or sum(lengths) != len(ids):
            lengths = [len(ids)]
        start = 0
        for n in lengths:
            if n > 0:
                examples.append((ids[start : start + n], labels[start : start + n]))
            start += n
    examples = examples[:max_rows]
    if not examples:
        raise UserError(no_rows)
    return examples


def load_heldout_conversations(prepared: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` conversations of ``<prepared>/eval.jsonl`` (each ends with the reference answer)."""
    path = prepared / "eval.jsonl"
    if n <= 0:
        return []
    if not path.is_file():
        raise UserError(
            f"{path}: not found; set `data.eval_size` > 0 or `data.eval_path` and re-run `kubetune "
            "prepare`, or set `eval.num_samples: 0`"
        )
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if len(rows) >= n:
                break
            if not line.strip():
                continue
            try:
                conv = json.loads(line)
                messages = conv["messages"]
                ok = isinstance(messages, list) and len(messages) >= 2 and messages[-1]["role"] == "assistant"
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise UserError(
                    f"{path} line {lineno}: not a prepared conversation ending with an assistant "
                    "message; re-run `kubetune prepare`"
                )
            rows.append(conv)
    return rows


def _training_method(adapter: Path, cfg: Config) -> str:
    try:
        return str(read_json(adapter / "training_summary.json").get("method") or cfg.method)
    except (OSError, ValueError, AttributeError):
        return cfg.method


# --------------------------------------------------------------------------------------------------------------
# Scoring


def _loss_sum(model, input_ids, attention_mask, labels) -> float:
    import torch.nn.functional as F

    # use_cache=False: no KV cache is needed and, for padding-free rows, it keeps sequences isolated.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    selected = logits[:, :-1][mask].float()
    return float(F.cross_entropy(selected, target[mask], reduction="sum").item())


def score(
    model, examples: list[tuple[list[int], list[int]]], *, batch_size: int, pad_id: int, desc: str = "scoring"
) -> tuple[float, int]:
    """(summed cross-entropy, number of loss tokens) of ``model`` over every label token of ``examples``.

    Token ``t`` is scored by the logits at ``t - 1``, as in training; examples are batched longest first with
    right padding (padded positions are masked out of attention and loss).
    """
    import torch

    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    started = time.monotonic()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(examples[i][0]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids, lab = examples[i]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[row, : len(ids)] = torch.tensor(lab, dtype=torch.long)
            attention[row, : len(ids)] = 1
        input_ids, labels, attention = input_ids.to(device), labels.to(device), attention.to(device)
        tokens += int((labels[:, 1:] != IGNORE_INDEX).sum().item())
        with torch.inference_mode():
            total += _loss_sum(model, input_ids, attention, labels)
        done = min(start + batch_size, len(order))
        log.info("%s: %d/%d held-out rows (%.1f s)", desc, done, len(order), time.monotonic() - started)
    return total, tokens


def perplexity(loss: float) -> float | None:
    """exp(loss); None when it overflows a float (a diverged model), so metrics.json stays valid JSON."""
    return math.exp(loss) if loss < 709 else None


# --------------------------------------------------------------------------------------------------------------
# The stage


def evaluate(
    cfg: Config,
    adapter: str | Path,
    packed: str | Path,
    prepared: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    dtype: str | None = None,
    device: str | None = None,
) -> Path:
    """Score and sample the adapter against its base; write the eval report folder ``out`` and return it.

    ``dtype``/``device`` default to fp32 on CPU (CUDA with its best half precision when present); the dtype is
    part of the fingerprint, so changing it re-evaluates.
    """
    adapter, packed, prepared, out = Path(adapter), Path(packed), Path(prepared), Path(out)
    a_m = read_manifest(adapter, "train")
    k_m = read_manifest(packed, "pack")
    d_m = read_manifest(prepared, "prepare")
    if not generation.is_adapter(adapter):
        raise UserError(
            f"{adapter}: has no {generation.ADAPTER_CONFIG}; evaluate needs the adapter folder from `kubetune train`"
        )
    device, dtype = generation.inference_settings(dtype, device)
    method = _training_method(adapter, cfg)
    settings = {
        "eval": dataclasses.asdict(cfg.eval),
        "system_prompt": cfg.data.system_prompt,
        "max_prompt_tokens": cfg.pack.max_length,
        "dtype": dtype,
        "method": method,
        "quant": dataclasses.asdict(cfg.quant) if method == "qlora" else None,
    }
    inputs = {
        "adapter": {"path": str(adapter.resolve()), "fingerprint": a_m["fingerprint"]},
        "packed": {"path": str(packed.resolve()), "fingerprint": k_m["fingerprint"]},
        "prepared": {"path": str(prepared.resolve()), "fingerprint": d_m["fingerprint"]},
    }
    fp = fingerprint("evaluate", a_m["fingerprint"], k_m["fingerprint"], d_m["fingerprint"], settings)
    with stage_output(out, "evaluate", fp, inputs=inputs, config=settings, overwrite=overwrite) as w:
        if w.up_to_date:
            return out
        examples = load_eval_examples(packed, cfg.eval.max_rows)
        heldout = load_heldout_conversations(prepared, cfg.eval.num_samples)
        loaded = generation.load(
            cfg.model,
            adapter,
            tokenizer_dir=packed / "tokenizer",
            dtype=dtype,
            quant=cfg.quant if method == "qlora" else None,
            device=device,
            threads=cfg.train.threads,
        )
        tok, model = loaded.tokenizer, loaded.model
        samples = _sample_prompts(cfg, heldout)
        texts = [generation.render_prompt(tok, s["messages"]) for s in samples]
        gen_kwargs = {
            "max_new_tokens": cfg.eval.max_new_tokens,
            "batch_size": cfg.eval.batch_size,
            "stop_ids": generation.stop_token_ids(tok, model),
            "max_prompt_tokens": cfg.pack.max_length,
        }
        timings = {"eval_seconds": 0.0, "generation_seconds": 0.0}

        def run(m, who: str) -> tuple[float, int, list[str]]:
            started = time.monotonic()
            loss_sum, tokens = score(
                m, examples, batch_size=cfg.eval.batch_size, pad_id=tok.pad_token_id, desc=f"scoring the {who}"
            )
            timings["eval_seconds"] += time.monotonic() - started
            started = time.monotonic()
            answers = generation.generate_texts(m, tok, texts, desc=f"generating with the {who}", **gen_kwargs)
            timings["generation_seconds"] += time.monotonic() - started
            return loss_sum, tokens, answers

        # The base first, exactly (the adapter switched off), then the adapter: merged into the weights when the
        # base is not quantised (the same function, one matmul per layer instead of three; on CPU the many small
        # LoRA matmuls cost more than their FLOPs suggest). A 4-bit base cannot take a merge without loss.
        with model.disable_adapter():
            base_sum, tokens, base_out = run(model, "base model")
        if tokens == 0:
            raise UserError(
                f"{packed / 'eval'}: the held-out rows carry no loss tokens (every label is -100); "
                "check `pack.loss_on` and that the conversations end with an assistant answer"
            )
        adapted = model.merge_and_unload() if method != "qlora" else model
        adapter_sum, _, adapter_out = run(adapted, "adapter")
        _score_samples(samples, base_out, adapter_out)

        metrics = _metrics(adapter_sum / tokens, base_sum / tokens, tokens, samples, len(examples), timings)
        write_json(w.tmp / "metrics.json", metrics)
        with open(w.tmp / "samples.jsonl", "w", encoding="utf-8") as fh:
            for s in samples:
                fh.write(json.dumps(s, ensure_ascii=False) + "\n")
        context = {
            "base": loaded.base.name_or_path,
            "adapter": str(adapter),
            "method": method,
            "dtype": dtype,
            "device": loaded.device,
            "max_new_tokens": cfg.eval.max_new_tokens,
            "global_step": _global_step(adapter),
        }
        (w.tmp / "eval_report.md").write_text(render_report(metrics, samples, context), encoding="utf-8")
        w.counts = {k: metrics[k] for k in ("eval_rows", "eval_tokens", "generation_rows", "prompt_rows")}
        log.info(
            "eval loss %.4f (base %.4f, delta %+.4f) on %d rows / %d tokens; report %s",
            metrics["eval_loss"],
            metrics["base_eval_loss"],
            metrics["eval_loss_delta"],
            len(examples),
            tokens,
            out / "eval_report.md",
        )
    return out


def _global_step(adapter: Path) -> int | None:
    try:
        return read_json(adapter / "training_summary.json").get("global_step")
    except (OSError, ValueError, AttributeError):
        return None


def _sample_prompts(cfg: Config, heldout: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The prompts to generate for: held-out conversations up to their final answer (the reference), then the
    fixed ``eval.prompts`` (with ``data.system_prompt`` when set, as prepare adds it to the data)."""
    system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    samples: list[dict[str, Any]] = []
    for conv in heldout:
        samples.append(
            {
                "kind": "heldout",
                "id": conv.get("id"),
                "source": conv.get("source"),
                "row": conv.get("row"),
                "messages": conv["messages"][:-1],
                "reference": conv["messages"][-1]["content"],
            }
        )
    for i, prompt in enumerate(cfg.eval.prompts):
        samples.append(
            {
                "kind": "prompt",
                "id": f"prompt-{i + 1}",
                "source": "eval.prompts",
                "row": i + 1,
                "messages": [*system, {"role": "user", "content": prompt}],
                "reference": None,
            }
        )
    return samples


def _score_samples(samples: list[dict[str, Any]], base_out: list[str], adapter_out: list[str]) -> None:
    for s, b, a in zip(samples, base_out, adapter_out, strict=True):
        s["base"], s["adapter"] = b, a
        ref = s["reference"]
        if ref is not None:
            s["base_exact_match"] = task_metrics.exact_match(b, ref)
            s["exact_match"] = task_metrics.exact_match(a, ref)
            s["base_rouge_l"] = round(task_metrics.rouge_l(b, ref), 6)
            s["rouge_l"] = round(task_metrics.rouge_l(a, ref), 6)


def _metrics(
    loss: float,
    base: float,
    tokens: int,
    samples: list[dict[str, Any]],
    rows: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    scored = [s for s in samples if s["reference"] is not None]
    refs = [s["reference"] for s in scored]
    return {
        "eval_loss": loss,
        "base_eval_loss": base,
        "eval_loss_delta": loss - base,
        "eval_perplexity": perplexity(loss),
        "base_eval_perplexity": perplexity(base),
        "exact_match": task_metrics.mean_exact_match([s["adapter"] for s in scored], refs),
        "base_exact_match": task_metrics.mean_exact_match([s["base"] for s in scored], refs),
        "rouge_l": task_metrics.mean_rouge_l([s["adapter"] for s in scored], refs),
        "base_rouge_l": task_metrics.mean_rouge_l([s["base"] for s in scored], refs),
        "eval_rows": rows,
        "eval_tokens": tokens,
        "generation_rows": len(scored),
        "prompt_rows": len(samples) - len(scored),
        "eval_seconds": round(timings["eval_seconds"], 3),
        "generation_seconds": round(timings["generation_seconds"], 3),
    }


# --------------------------------------------------------------------------------------------------------------
# The report


def _num(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None, n: int) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}% ({round(v * n)}/{n})"


def _cell(text: str | None) -> str:
    if text is None:
        return ""
    text = text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    return text or "*(empty)*"


def render_report(m: dict[str, Any], samples: list[dict[str, Any]], ctx: dict[str, Any]) -> str:
    """The Markdown report (``eval_report.md``): :func:`build_report` rendered as Markdown."""
    return rpt.to_markdown(build_report(m, samples, ctx))


def build_report(m: dict[str, Any], samples: list[dict[str, Any]], ctx: dict[str, Any]) -> rpt.Report:
    """The evaluation report: what was compared, the headline table, the verdict, then every sample."""
    n = m["generation_rows"]
    delta = m["eval_loss_delta"]
    ppl_a, ppl_b = m["eval_perplexity"], m["base_eval_perplexity"]
    step = f", step {ctx['global_step']}" if ctx.get("global_step") is not None else ""
    rows = [["eval loss (lower is better)", _num(m["base_eval_loss"]), _num(m["eval_loss"]), f"{delta:+.4f}"]]
    if ppl_a is not None and ppl_b is not None:
        rows.append(["perplexity", f"{ppl_b:.3f}", f"{ppl_a:.3f}", f"{100 * (ppl_a / ppl_b - 1):+.1f}%"])
    else:
        rows.append(["perplexity", _num(ppl_b, 3), _num(ppl_a, 3), "n/a"])
    if n:
        em_d = 100 * (m["exact_match"] - m["base_exact_match"])
        rl_d = m["rouge_l"] - m["base_rouge_l"]
        rows += [
            ["exact match", _pct(m["base_exact_match"], n), _pct(m["exact_match"], n), f"{em_d:+.1f} pts"],
            ["ROUGE-L F1", _num(m["base_rouge_l"], 3), _num(m["rouge_l"], 3), f"{rl_d:+.3f}"],
        ]
    if delta < 0:
        verdict = f"The adapter lowers the held-out loss by {-delta:.4f} nats per token"
    elif delta > 0:
        verdict = f"The adapter raises the held-out loss by {delta:.4f} nats per token (worse than the base)"
    else:
        verdict = "The adapter leaves the held-out loss unchanged"
    if ppl_a is not None and ppl_b is not None:
        verdict += f" (perplexity {ppl_b:.3f} -> {ppl_a:.3f})"
    verdict += "."
    scored = [s for s in samples if s["reference"] is not None]
    if scored:
        better = sum(s["rouge_l"] > s["base_rouge_l"] for s in scored)
        worse = sum(s["rouge_l"] < s["base_rouge_l"] for s in scored)
        verdict += (
            f"\nBy ROUGE-L the adapter's answer is closer to the reference on {better} of {n} held-out "
            f"prompts, further on {worse}, level on {n - better - worse}."
        )
    blocks: list[rpt.Block] = [
        rpt.Paragraph(
            f"Base model `{ctx['base']}` with adapter `{ctx['adapter']}` ({ctx['method']}{step}); scored in "
            f"{ctx['dtype']} on {ctx['device']}.\n"
            f"Loss on {m['eval_rows']} held-out rows ({m['eval_tokens']} answer tokens, the tokens the training "
            f"loss uses); greedy generation ({ctx['max_new_tokens']} new tokens at most) on {n} held-out prompt(s)"
            + (f" and {m['prompt_rows']} fixed prompt(s)." if m["prompt_rows"] else ".")
        ),
        rpt.Table(["metric", "base", "adapter", "change"], rows, ["left", "right", "right", "right"]),
        rpt.Paragraph(verdict),
        rpt.Paragraph(
            "Exact match compares case-folded, whitespace-normalised text (a reference contained in a longer "
            "answer does not count); ROUGE-L is the F1 of the longest common token subsequence (stemmed)."
        ),
    ]
    if samples:
        blocks.append(rpt.Section("Samples: base vs adapter", [_sample(i, s) for i, s in enumerate(samples, 1)]))
    return rpt.Report("Evaluation: adapter vs base model", blocks)


def _sample(i: int, s: dict[str, Any]) -> rpt.Section:
    where = (
        f"held-out row {s['row']} of {s['source']}"
        if s["kind"] == "heldout"
        else f"fixed prompt {s['row']} (eval.prompts)"
    )
    blocks: list[rpt.Block] = []
    for msg in s["messages"]:
        blocks += [rpt.Paragraph(f"**{msg['role']}**"), rpt.Quote(msg["content"])]
    if s["reference"] is not None:
        blocks.append(
            rpt.Table(
                ["", "answer", "exact match", "ROUGE-L"],
                [
                    ["reference", _cell(s["reference"]), "", ""],
                    ["base", _cell(s["base"]), "yes" if s["base_exact_match"] else "no", f"{s['base_rouge_l']:.3f}"],
                    ["adapter", _cell(s["adapter"]), "yes" if s["exact_match"] else "no", f"{s['rouge_l']:.3f}"],
                ],
                ["left", "left", "center", "right"],
            )
        )
    else:
        blocks.append(rpt.Table(["", "answer"], [["base", _cell(s["base"])], ["adapter", _cell(s["adapter"])]]))
    return rpt.Section(f"{i}. {where}", blocks, level=3)
