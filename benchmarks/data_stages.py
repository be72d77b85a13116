"""Data stages: ``kubetune prepare`` and ``kubetune pack`` throughput on LIMA, and how they scale with the dataset
size (1x, 4x, 16x the rows) and with ``pack.num_proc`` (1, 2).

    python -m benchmarks.data_stages [--quick] [--sizes 1,4,16] [--num-proc 1,2] [--out FILE]

The k-times file holds k copies of the rows; copy c > 0 has `` (copy c)`` appended to every instruction, so the
copies are distinct conversations and prepare's de-duplication keeps them all. Every run is its own subprocess with
a fresh, empty ``datasets`` cache (``HF_DATASETS_CACHE``), so pack tokenises everything and reuses nothing. The time
is the stage call alone (the worker times ``prepare()``/``pack()``; interpreter start and imports are reported
apart as ``process_seconds``). tokens/s counts the tokens pack produced from the rows (before truncation), for
prepare too, so the two stages are on one scale; pack's per-core figure divides by the processes it used.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import BenchError, Recorder, progress

# ==============================================================================================================
# Worker side


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from kubetune.artifacts import read_json
    from kubetune.config import from_dict

    raw = {
        "model": {"name_or_path": spec["model"]},
        "data": {"path": spec["data"], "eval_size": spec["eval_size"]},
        "pack": {"max_length": spec["max_length"], "num_proc": spec.get("num_proc", 0)},
    }
    cfg = from_dict(raw)
    out = Path(spec["out"])
    t0 = time.perf_counter()
    if spec["stage"] == "prepare":
        from kubetune.prepare import prepare

        prepare(cfg, out, overwrite=True)
        seconds = time.perf_counter() - t0
        totals = read_json(out / "data_report.json")["totals"]
        return {"seconds": seconds, "rows_read": totals["rows_read"], "rows_kept": totals["rows_kept"]}
    from kubetune.pack import num_proc, pack

    pack(cfg, spec["prepared"], out, overwrite=True)
    seconds = time.perf_counter() - t0
    report = read_json(out / "pack_report.json")
    return {
        "seconds": seconds,
        "report_seconds": report["seconds"],
        "tokens_in": report["train"]["tokens_in"] + report["eval"]["tokens_in"],
        "examples_in": report["train"]["examples_in"] + report["eval"]["examples_in"],
        "train_rows": report["train"]["rows"],
        "packing_efficiency": report["train"]["packing_efficiency"],
        "procs": num_proc(spec.get("num_proc", 0), report["train"]["examples_in"]),
    }


# ==============================================================================================================
# Parent side


def replicate(src: Path, dest: Path, copies: int) -> int:
    """Write ``copies`` distinct copies of the JSON Lines rows of ``src`` to ``dest``; return the row count."""
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    key = next((k for k in ("instruction", "prompt", "question", "input") if k in rows[0]), None)
    if key is None:
        raise BenchError(f"{src}: rows have no instruction/prompt/question field to make distinct copies of")
    with open(dest, "w", encoding="utf-8") as fh:
        for c in range(copies):
            for row in rows:
                if c:
                    row = {**row, key: f"{row[key]} (copy {c})"}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return copies * len(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_stages", description=__doc__.split("\n\n")[0])
    common.common_args(p)
    p.add_argument("--data", type=Path, default=common.LIMA)
    p.add_argument("--model", default=common.SMOLLM2, help="whose tokenizer pack uses")
    p.add_argument("--sizes", default="1,4,16", help="dataset sizes as multiples of the file's rows")
    p.add_argument("--num-proc", default="1,2", help="pack.num_proc values to compare")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--eval-size", type=float, default=0.05)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = "1,4"
        args.num_proc = "1"
        args.quiet_wait = min(args.quiet_wait, 15.0)
    return args


def run(args: argparse.Namespace, rec: Recorder) -> list[dict[str, Any]]:
    from kubetune import models
    from kubetune.config import ModelConfig

    if not Path(args.data).is_file():
        raise BenchError(f"{args.data}: data file not found (the LIMA rows live in ../shared/data/lima)")
    sizes = [int(s) for s in args.sizes.split(",")]
    procs = [int(s) for s in args.num_proc.split(",")]
    work = common.make_workdir(args.workdir, "data")
    model_dir = models.resolve(ModelConfig(name_or_path=args.model)).path
    records: list[dict[str, Any]] = []
    by_key: dict[tuple[str, int, int], dict[str, Any]] = {}
    try:
        for k in sizes:
            data = work / f"rows-x{k}.jsonl"
            n = replicate(Path(args.data), data, k)
            base = {"model": model_dir, "data": str(data), "eval_size": args.eval_size, "max_length": args.max_length}

            def one(stage: str, n_proc: int, extra: dict[str, Any], k=k, base=base) -> common.WorkerResult:
                name = f"{stage}-x{k}" + (f"-p{n_proc}" if stage == "pack" else "")
                quiet = common.wait_for_quiet(args.quiet_wait) if args.quiet_wait else {}
                progress(f"data: {name} (CPUs busy before: {quiet.get('busy_before')})")
                return common.run_worker(
                    "data_stages",
                    {**base, "stage": stage, "num_proc": n_proc, **extra},
                    workdir=work,
                    name=name,
                    timeout_s=args.timeout,
                    verbose=args.verbose,
                    env={"HF_DATASETS_CACHE": str(work / f"hf-cache-{name}")},
                )

            prep = one("prepare", 1, {"out": str(work / f"prepared-x{k}")})
            packs = {
                p: one("pack", p, {"out": str(work / f"packed-x{k}-p{p}"), "prepared": str(work / f"prepared-x{k}")})
                for p in procs
            }
            tokens = next(iter(packs.values())).result["tokens_in"]
            r = prep.result
            by_key[("prepare", k, 1)] = rec.emit(
                {
                    "bench": "data",
                    "name": f"prepare x{k}",
                    "stage": "prepare",
                    "size": k,
                    "rows": n,
                    "rows_kept": r["rows_kept"],
                    "num_proc": 1,
                    "seconds": round(r["seconds"], 2),
                    "process_seconds": round(prep.wall_seconds, 1),
                    "rows_per_second": round(r["rows_read"] / r["seconds"]),
                    "tokens_per_second": round(tokens / r["seconds"]),
                    "tokens_per_second_per_core": round(tokens / r["seconds"]),
                    "peak_rss_gib": common.gib(prep.peak_rss_bytes),
                }
            )
            records.append(by_key[("prepare", k, 1)])
            for p, res in packs.items():
                r = res.result
                used = r["procs"]
                by_key[("pack", k, p)] = rec.emit(
                    {
                        "bench": "data",
                        "name": f"pack x{k} num_proc={p}",
                        "stage": "pack",
                        "size": k,
                        "rows": r["examples_in"],
                        "num_proc": used,
                        "seconds": round(r["seconds"], 2),
                        "process_seconds": round(res.wall_seconds, 1),
                        "rows_per_second": round(r["examples_in"] / r["seconds"]),
                        "tokens": r["tokens_in"],
                        "tokens_per_second": round(r["tokens_in"] / r["seconds"]),
                        "tokens_per_second_per_core": round(r["tokens_in"] / r["seconds"] / used),
                        "packing_efficiency": r["packing_efficiency"],
                        "peak_rss_gib": common.gib(res.peak_rss_bytes),
                    }
                )
                records.append(by_key[("pack", k, p)])
        smallest = min(sizes)
        for (stage, k, p), r in by_key.items():
            if k == smallest:
                continue
            ref = by_key[(stage, smallest, p)]
            time_ratio = r["seconds"] / ref["seconds"]
            records.append(
                rec.emit(
                    {
                        "bench": "data-scaling",
                        "name": f"{stage} x{k} / x{smallest}" + (f" num_proc={p}" if stage == "pack" else ""),
                        "rows_ratio": round(k / smallest, 1),
                        "time_ratio": round(time_ratio, 2),
                        "linear_or_better": time_ratio <= (k / smallest) * 18 / 16,
                    }
                )
            )
        for k in sizes:
            if ("pack", k, 1) in by_key and ("pack", k, 2) in by_key:
                one_p, two_p = by_key[("pack", k, 1)], by_key[("pack", k, 2)]
                records.append(
                    rec.emit(
                        {
                            "bench": "data-scaling",
                            "name": f"pack x{k}: num_proc {two_p['num_proc']} vs 1",
                            "speedup": round(one_p["seconds"] / two_p["seconds"], 2),
                        }
                    )
                )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return records


DATA_COLUMNS = [
    ("run", "name"),
    ("rows", "rows"),
    ("procs", "num_proc"),
    ("seconds", "seconds"),
    ("rows/s", "rows_per_second"),
    ("tokens/s", "tokens_per_second"),
    ("tokens/s/core", "tokens_per_second_per_core"),
    ("process s", "process_seconds"),
    ("peak RSS GiB", "peak_rss_gib"),
    ("load avg", "load_avg"),
]
SCALING_COLUMNS = [
    ("comparison", "name"),
    ("rows ratio", "rows_ratio"),
    ("time ratio", "time_ratio"),
    ("<= linear (+12.5%)", "linear_or_better"),
    ("speedup", "speedup"),
]


def tables(records: list[dict[str, Any]]) -> str:
    return common.tables(records, [("Data stages", DATA_COLUMNS, "data"), ("Scaling", SCALING_COLUMNS, "data-scaling")])


def main(argv=None) -> int:
    return common.bench_main(
        argv,
        section="data",
        parse_args=parse_args,
        run=run,
        tables=tables,
        run_worker=run_worker,
    )


if __name__ == "__main__":
    raise SystemExit(main())
